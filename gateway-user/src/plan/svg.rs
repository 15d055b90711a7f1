//! The measured curve as a small SVG: achieved QPS and p50/p99 latency
//! against offered QPS, with the measured peak and the planned load marked.
//!
//! Written by hand: two line charts are a few dozen elements, and a
//! plotting crate (plotters and its font stack) would be most of the
//! binary's new dependencies for them.

use std::fmt::Write as _;

use super::knee::{StageStats, Verdict};

const WIDTH: f64 = 720.0;
const PANEL_HEIGHT: f64 = 220.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 20.0;
const TOP: f64 = 40.0;
const GAP: f64 = 60.0;

/// Marks drawn across both panels, at an offered QPS.
pub struct Marks {
    pub peak_qps: f64,
    pub sustainable_qps: f64,
}

/// Renders the stages (in any order) as an SVG document.
pub fn render(title: &str, stages: &[(StageStats, Verdict)], marks: &Marks) -> String {
    let mut points: Vec<&(StageStats, Verdict)> = stages.iter().collect();
    points.sort_by(|a, b| a.0.offered_qps.total_cmp(&b.0.offered_qps));
    let max_qps = points.iter().map(|(s, _)| s.offered_qps.max(s.achieved_qps)).fold(1.0, f64::max) * 1.05;
    let ms = |d: Option<std::time::Duration>| d.map(|d| d.as_secs_f64() * 1e3);
    let max_ms = points.iter().filter_map(|(s, _)| ms(s.p99)).fold(1.0, f64::max) * 1.1;
    let height = TOP + 2.0 * PANEL_HEIGHT + GAP + 50.0;
    let plot_width = WIDTH - LEFT - RIGHT;
    let x = |qps: f64| LEFT + qps / max_qps * plot_width;
    let top_y = |v: f64| TOP + PANEL_HEIGHT - v / max_qps * PANEL_HEIGHT;
    let bottom_top = TOP + PANEL_HEIGHT + GAP;
    let bottom_y = |v: f64| bottom_top + PANEL_HEIGHT - v / max_ms * PANEL_HEIGHT;

    let mut svg = String::new();
    // Writing into a String cannot fail.
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(svg, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(svg, r#"<text x="{LEFT}" y="20" font-size="14" font-weight="bold">{}</text>"#, escape(title));
    for (panel_top, label, max) in [(TOP, "achieved QPS", max_qps), (bottom_top, "latency ms", max_ms)] {
        axes(&mut svg, panel_top, label, max, max_qps, plot_width);
    }
    // Ideal: achieved = offered.
    let _ = writeln!(
        svg,
        r##"<line x1="{}" y1="{}" x2="{}" y2="{}" stroke="#bbb" stroke-dasharray="4 3"/>"##,
        x(0.0),
        top_y(0.0),
        x(max_qps),
        top_y(max_qps)
    );
    series(&mut svg, "#1f77b4", points.iter().map(|(s, v)| (x(s.offered_qps), top_y(s.achieved_qps), v)));
    series(&mut svg, "#2ca02c", points.iter().filter_map(|(s, v)| Some((x(s.offered_qps), bottom_y(ms(s.p50)?), v))));
    series(&mut svg, "#d62728", points.iter().filter_map(|(s, v)| Some((x(s.offered_qps), bottom_y(ms(s.p99)?), v))));
    for (qps, color, label) in
        [(marks.peak_qps, "#ff7f0e", "measured peak"), (marks.sustainable_qps, "#9467bd", "plan for (× margin)")]
    {
        if qps > 0.0 && qps <= max_qps {
            let _ = writeln!(
                svg,
                r#"<line x1="{0:.1}" y1="{TOP}" x2="{0:.1}" y2="{1:.1}" stroke="{color}" stroke-dasharray="6 4"/><text x="{2:.1}" y="{3:.1}" fill="{color}">{label} {qps:.1}</text>"#,
                x(qps),
                bottom_top + PANEL_HEIGHT,
                x(qps) + 4.0,
                TOP + 14.0 + if color == "#ff7f0e" { 0.0 } else { 16.0 },
            );
        }
    }
    let legend_y = bottom_top + PANEL_HEIGHT + 40.0;
    for (i, (color, label)) in [("#1f77b4", "achieved QPS"), ("#2ca02c", "p50"), ("#d62728", "p99")].iter().enumerate()
    {
        let lx = LEFT + i as f64 * 130.0;
        let _ = writeln!(
            svg,
            r#"<rect x="{lx}" y="{}" width="12" height="12" fill="{color}"/><text x="{}" y="{legend_y}">{label}</text>"#,
            legend_y - 10.0,
            lx + 16.0
        );
    }
    let _ = writeln!(svg, r#"<text x="{}" y="{legend_y}">hollow: past the knee</text></svg>"#, LEFT + 3.0 * 130.0);
    svg
}

fn axes(svg: &mut String, top: f64, label: &str, max: f64, max_qps: f64, plot_width: f64) {
    let bottom = top + PANEL_HEIGHT;
    let _ = writeln!(
        svg,
        r##"<line x1="{LEFT}" y1="{top}" x2="{LEFT}" y2="{bottom}" stroke="#333"/><line x1="{LEFT}" y1="{bottom}" x2="{}" y2="{bottom}" stroke="#333"/>"##,
        LEFT + plot_width
    );
    for tick in 0..=4 {
        let f = f64::from(tick) / 4.0;
        let y = bottom - f * PANEL_HEIGHT;
        let tx = LEFT + f * plot_width;
        let _ = writeln!(
            svg,
            r##"<text x="{}" y="{:.1}" text-anchor="end">{:.0}</text><text x="{tx:.1}" y="{}" text-anchor="middle">{:.0}</text>"##,
            LEFT - 6.0,
            y + 4.0,
            f * max,
            bottom + 16.0,
            f * max_qps
        );
    }
    let _ = writeln!(
        svg,
        r#"<text x="{LEFT}" y="{}">{label}</text><text x="{}" y="{}" text-anchor="end">offered QPS</text>"#,
        top - 6.0,
        LEFT + plot_width,
        bottom + 32.0
    );
}

fn series<'a>(svg: &mut String, color: &str, points: impl Iterator<Item = (f64, f64, &'a Verdict)>) {
    let points: Vec<_> = points.collect();
    let path: Vec<String> = points.iter().map(|(x, y, _)| format!("{x:.1},{y:.1}")).collect();
    let _ = writeln!(svg, r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="2"/>"#, path.join(" "));
    for (x, y, verdict) in points {
        let fill = if *verdict == Verdict::Sustained { color } else { "white" };
        let _ = writeln!(svg, r#"<circle cx="{x:.1}" cy="{y:.1}" r="4" fill="{fill}" stroke="{color}"/>"#);
    }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::plan::knee::Degradation;

    #[test]
    fn renders_every_stage_and_the_marks() {
        let stage = |q: f64, p99: u64| StageStats {
            offered_qps: q,
            achieved_qps: q.min(40.0),
            sent: 10,
            errors: 0,
            p50: Some(Duration::from_millis(p99 / 2)),
            p99: Some(Duration::from_millis(p99)),
        };
        let degraded =
            Verdict::Degraded(Degradation::Latency { p99: Duration::from_secs(1), limit: Duration::from_millis(200) });
        let stages = vec![
            (stage(10.0, 100), Verdict::Sustained),
            (stage(60.0, 1000), degraded),
            (stage(30.0, 110), Verdict::Sustained),
        ];
        let svg = render("model <m>", &stages, &Marks { peak_qps: 30.0, sustainable_qps: 19.5 });
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<circle").count(), 9, "three series of three stages");
        assert_eq!(svg.matches(r#"fill="white" stroke"#).count(), 3, "the knee stage is hollow in each series");
        assert!(svg.contains("measured peak 30.0") && svg.contains("19.5"));
        assert!(svg.contains("model &lt;m&gt;"));
    }
}
