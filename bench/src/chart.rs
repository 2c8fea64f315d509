//! The chart in BENCHMARKS.md, drawn as a plain SVG by hand so the bench
//! needs no plotting dependency: bulk throughput per scenario (left) and
//! set-up latency p50 / p99 (right), one coloured bar per system.

use std::fmt::Write as _;

use crate::report::{RunReport, COLUMNS};
use crate::run::millis;
use crate::systems::SystemKind;
use crate::workloads::bulk::Direction;

const WIDTH: f64 = 1000.0;
const HEIGHT: f64 = 430.0;
const PLOT_TOP: f64 = 60.0;
const PLOT_BOTTOM: f64 = 340.0;

fn colour(kind: SystemKind) -> &'static str {
    match kind {
        SystemKind::Direct => "#8c8c8c",
        SystemKind::Devstreams => "#1f77b4",
        SystemKind::DevstreamsNoResume => "#aec7e8",
        SystemKind::DevstreamsCluster => "#9467bd",
        SystemKind::Rathole => "#ff7f0e",
        SystemKind::Bore => "#2ca02c",
    }
}

/// A group of bars: its label and one value per system (None: not measured).
struct Group {
    label: String,
    values: Vec<(SystemKind, Option<f64>)>,
}

pub fn render(report: &RunReport) -> String {
    let kinds: Vec<SystemKind> = COLUMNS
        .iter()
        .copied()
        .filter(|kind| report.system(*kind).is_some())
        .collect();
    let parallel = report.plan.bulk_parallel_streams;
    let throughput: Vec<Group> = [
        (1, Direction::Upload),
        (1, Direction::Download),
        (parallel, Direction::Upload),
        (parallel, Direction::Download),
    ]
    .into_iter()
    .map(|(streams, direction)| Group {
        label: format!(
            "{streams} stream{} {}",
            if streams == 1 { "" } else { "s" },
            if direction == Direction::Upload {
                "up"
            } else {
                "down"
            }
        ),
        values: kinds
            .iter()
            .map(|kind| {
                let value = report
                    .system(*kind)
                    .and_then(|system| system.bulk(direction, streams))
                    .map(|run| run.megabytes_per_second());
                (*kind, value)
            })
            .collect(),
    })
    .collect();
    let setup: Vec<Group> = [("p50", true), ("p99", false)]
        .into_iter()
        .map(|(label, p50)| Group {
            label: label.to_string(),
            values: kinds
                .iter()
                .map(|kind| {
                    let value = report
                        .system(*kind)
                        .and_then(|system| system.setup.as_ref()?.latency)
                        .map(|latency| millis(if p50 { latency.p50 } else { latency.p99 }));
                    (*kind, value)
                })
                .collect(),
        })
        .collect();

    let mut svg = String::new();
    let _ = writeln!(
        svg,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{HEIGHT}\" viewBox=\"0 0 {WIDTH} {HEIGHT}\" \
         font-family=\"sans-serif\" font-size=\"12\">"
    );
    let _ = writeln!(svg, "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>");
    panel(
        &mut svg,
        "Bulk throughput (MB/s, higher is better)",
        &throughput,
        60.0,
        580.0,
        0,
    );
    panel(
        &mut svg,
        "Set-up latency (ms, lower is better)",
        &setup,
        660.0,
        980.0,
        2,
    );
    let mut x = 60.0;
    for kind in &kinds {
        let _ = writeln!(
            svg,
            "<rect x=\"{x}\" y=\"{}\" width=\"14\" height=\"14\" fill=\"{}\"/>",
            HEIGHT - 40.0,
            colour(*kind)
        );
        let _ = writeln!(
            svg,
            "<text x=\"{}\" y=\"{}\">{}</text>",
            x + 20.0,
            HEIGHT - 28.0,
            kind.label()
        );
        x += 190.0;
    }
    let _ = writeln!(svg, "</svg>");
    svg
}

fn panel(svg: &mut String, title: &str, groups: &[Group], left: f64, right: f64, decimals: usize) {
    let maximum = groups
        .iter()
        .flat_map(|group| group.values.iter().filter_map(|(_, value)| *value))
        .fold(0.0_f64, f64::max);
    let scale_top = nice_ceiling(maximum);
    let height = PLOT_BOTTOM - PLOT_TOP;
    let y_of = |value: f64| PLOT_BOTTOM - value / scale_top * height;
    let _ = writeln!(
        svg,
        "<text x=\"{left}\" y=\"{}\" font-size=\"14\" font-weight=\"bold\">{title}</text>",
        PLOT_TOP - 30.0
    );
    for step in 0..=4 {
        let value = scale_top * step as f64 / 4.0;
        let y = y_of(value);
        let _ = writeln!(
            svg,
            "<line x1=\"{left}\" y1=\"{y:.1}\" x2=\"{right}\" y2=\"{y:.1}\" stroke=\"#e0e0e0\"/>"
        );
        let _ = writeln!(svg, "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\" fill=\"#555\">{value:.decimals$}</text>", left - 6.0, y + 4.0);
    }
    let group_width = (right - left) / groups.len().max(1) as f64;
    for (index, group) in groups.iter().enumerate() {
        let group_left = left + index as f64 * group_width;
        let bars = group.values.len().max(1) as f64;
        let bar_width = (group_width * 0.8) / bars;
        for (bar, (kind, value)) in group.values.iter().enumerate() {
            let x = group_left + group_width * 0.1 + bar as f64 * bar_width;
            let Some(value) = value else { continue };
            let y = y_of(*value);
            let _ = writeln!(
                svg,
                "<rect x=\"{x:.1}\" y=\"{y:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"{}\"/>",
                bar_width - 2.0,
                PLOT_BOTTOM - y,
                colour(*kind)
            );
            let _ = writeln!(
                svg,
                "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\" font-size=\"10\">{value:.decimals$}</text>",
                x + bar_width / 2.0 - 1.0,
                y - 4.0
            );
        }
        let _ = writeln!(
            svg,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
            group_left + group_width / 2.0,
            PLOT_BOTTOM + 18.0,
            group.label
        );
    }
    let _ = writeln!(svg, "<line x1=\"{left}\" y1=\"{PLOT_BOTTOM}\" x2=\"{right}\" y2=\"{PLOT_BOTTOM}\" stroke=\"#333\"/>");
}

/// The smallest round number (1, 1.5, 2, 2.5, 3, 4, 5, 6, 8 × 10^n) at or
/// above `value`: an axis top.
fn nice_ceiling(value: f64) -> f64 {
    if value <= 0.0 || !value.is_finite() {
        return 1.0;
    }
    let magnitude = 10f64.powf(value.log10().floor());
    [1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0]
        .iter()
        .map(|factor| factor * magnitude)
        .find(|top| *top >= value)
        .unwrap_or(10.0 * magnitude)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn axis_tops_are_round() {
        assert_eq!(nice_ceiling(0.0), 1.0);
        assert_eq!(nice_ceiling(3.2), 4.0);
        assert_eq!(nice_ceiling(1800.0), 2000.0);
        assert_eq!(nice_ceiling(2659.0), 3000.0);
        assert!((nice_ceiling(0.07) - 0.08).abs() < 1e-12);
    }
}
