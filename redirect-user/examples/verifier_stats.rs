//! Prints, for every program of the loaded program set, how many
//! instructions the kernel's verifier processed and how long it took to
//! load: the cost behind cold start (docs/BENCHMARKS.md).
//!
//! ```sh
//! cargo run --release --example verifier_stats    # as root
//! ```

use redirect::{LoadOptions, Programs};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let programs = Programs::load(&LoadOptions::default())?;
    let ids: Vec<(&str, u32)> = programs.program_ids();
    for info in aya::programs::loaded_programs() {
        let info = info?;
        if let Some((name, _)) = ids.iter().find(|(_, id)| *id == info.id()) {
            println!(
                "{name:<14} verified_insns={:<7} xlated_bytes={}",
                info.verified_instruction_count().unwrap_or(0),
                info.size_translated().unwrap_or(0)
            );
        }
    }
    Ok(())
}
