//! The chart: one panel per workload, a bar per path at its median ratio
//! to direct, with a min–max whisker, and a line at 1.0 (as fast as
//! direct). The last panel is the connection rate with 1, 100 and 10,000
//! mappings, relative to 1.

use std::path::Path;

use anyhow::{Context as _, anyhow};
use plotters::{coord::ranged1d::SegmentValue, prelude::*};

use super::{
    MAPPING_COUNTS,
    report::{Results, Stat},
    workloads::Metric,
};

/// DejaVu Sans, from Debian's fonts-dejavu-core (plotters draws text with
/// ab_glyph from a font file, not from the system's font config).
const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

const COLORS: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
];

pub fn draw(r: &Results, out: &Path) -> anyhow::Result<()> {
    let font = std::fs::read(FONT)
        .with_context(|| format!("reading {FONT} (apt-get install fonts-dejavu-core)"))?;
    plotters::style::register_font(
        "sans-serif",
        FontStyle::Normal,
        Box::leak(font.into_boxed_slice()),
    )
    .map_err(|_| anyhow!("{FONT} is not a usable font"))?;

    let root = BitMapBackend::new(out, (1800, 1000)).into_drawing_area();
    root.fill(&WHITE)?;
    let (title, body) = root.split_vertically(50);
    title.draw_text(
        &format!(
            "redirect: ratio to the direct path measured at the same time (median, trimmed range), {} rounds — {}",
            r.reps, r.machine
        ),
        &("sans-serif", 20).into_font().color(&BLACK),
        (15, 15),
    )?;
    let panels = body.split_evenly((2, 4));
    let paths: Vec<&str> = r
        .paths
        .iter()
        .filter(|p| !p.is_direct && !r.skipped.iter().any(|(n, _)| *n == p.name))
        .map(|p| p.name)
        .collect();
    for (panel, m) in panels.iter().zip(Metric::ALL) {
        let bars: Vec<(usize, Stat)> = paths
            .iter()
            .enumerate()
            .filter_map(|(j, p)| r.ratio(p, m).map(|s| (j, s)))
            .collect();
        let caption = if m.higher_is_better() {
            format!("{} (higher is better)", m.label())
        } else {
            format!("{} (lower is better)", m.label())
        };
        panel_chart(panel, &caption, &paths, &bars, |j| COLORS[j % COLORS.len()])?;
    }
    let labels: Vec<String> = MAPPING_COUNTS
        .iter()
        .map(|n| format!("{n} mapping{}", if *n == 1 { "" } else { "s" }))
        .collect();
    let labels: Vec<&str> = labels.iter().map(String::as_str).collect();
    let bars: Vec<(usize, Stat)> = MAPPING_COUNTS
        .iter()
        .enumerate()
        .filter_map(|(j, n)| r.scale_ratios.get(n).map(|v| (j, Stat::of(v))))
        .collect();
    panel_chart(
        &panels[7],
        "redirect conn/s vs 1 mapping",
        &labels,
        &bars,
        |_| COLORS[0],
    )?;
    root.present()?;
    Ok(())
}

fn panel_chart(
    area: &DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>,
    caption: &str,
    labels: &[&str],
    bars: &[(usize, Stat)],
    color: impl Fn(usize) -> RGBColor,
) -> anyhow::Result<()> {
    let ymax = bars.iter().map(|(_, s)| s.max).fold(1.2_f64, f64::max) * 1.1;
    let n = labels.len();
    let mut chart = ChartBuilder::on(area)
        .caption(caption, ("sans-serif", 17))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(50)
        // A segmented range over 0..k has k + 1 slots: one per label.
        .build_cartesian_2d((0..n.saturating_sub(1)).into_segmented(), 0.0..ymax)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(n)
        .x_label_formatter(&|v| match v {
            SegmentValue::CenterOf(j) => labels.get(*j).copied().unwrap_or("").to_owned(),
            _ => String::new(),
        })
        .x_label_style(("sans-serif", 13))
        .y_desc("× direct")
        .y_label_style(("sans-serif", 13))
        .draw()?;
    chart.draw_series(bars.iter().map(|(j, s)| {
        let mut bar = Rectangle::new(
            [
                (SegmentValue::Exact(*j), 0.0),
                (SegmentValue::Exact(*j + 1), s.median),
            ],
            color(*j).filled(),
        );
        bar.set_margin(0, 0, 10, 10);
        bar
    }))?;
    chart.draw_series(bars.iter().map(|(j, s)| {
        PathElement::new(
            vec![
                (SegmentValue::CenterOf(*j), s.min),
                (SegmentValue::CenterOf(*j), s.max),
            ],
            BLACK.stroke_width(2),
        )
    }))?;
    chart.draw_series(std::iter::once(PathElement::new(
        vec![(SegmentValue::Exact(0), 1.0), (SegmentValue::Exact(n), 1.0)],
        BLACK.stroke_width(1),
    )))?;
    Ok(())
}
