//! `--plot`: allowed vs denied per second, and p99 latency, drawn as SVG (plotters), or PNG
//! (that SVG rendered by resvg with the system's fonts).

use std::path::Path;

use anyhow::Context as _;
use plotters::prelude::*;

use crate::report::Summary;

const SIZE: (u32, u32) = (1000, 640);

/// Draws the timeline up to `seconds` (the stragglers answered after the run's end would show as
/// a misleading drop).
pub fn draw(summary: &Summary, seconds: usize, path: &Path) -> anyhow::Result<()> {
    let svg = svg(summary, seconds.max(1))?;
    match path.extension().and_then(|e| e.to_str()) {
        Some("png") => png(&svg, path),
        _ => std::fs::write(path, svg).with_context(|| format!("{}", path.display())),
    }
}

fn svg(s: &Summary, shown: usize) -> anyhow::Result<String> {
    let timeline = &s.timeline[..s.timeline.len().min(shown)];
    let mut out = String::new();
    {
        let root = SVGBackend::with_string(&mut out, SIZE).into_drawing_area();
        root.fill(&WHITE)?;
        let (top, bottom) = root.split_vertically(SIZE.1 * 3 / 5);
        let seconds = timeline.len().max(1) as u32;
        let max_count = timeline
            .iter()
            .map(|t| t.allowed.max(t.denied).max(t.errors))
            .max()
            .unwrap_or(1)
            .max(1);

        let title = format!(
            "sluicegate-load {}: {} requests, {:.0}/s, {} allowed, {} denied, {} errors",
            s.api, s.requests, s.rate, s.allowed, s.denied, s.errors
        );
        let mut chart = ChartBuilder::on(&top)
            .caption(title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(30)
            .y_label_area_size(70)
            .build_cartesian_2d(0u32..seconds, 0u64..(max_count + max_count / 10 + 1))?;
        chart
            .configure_mesh()
            .x_desc("second")
            .y_desc("requests per second")
            .draw()?;
        let series = |f: fn(&crate::report::SecondJson) -> u64| {
            timeline
                .iter()
                .map(move |t| (t.second as u32, f(t)))
                .collect::<Vec<_>>()
        };
        chart
            .draw_series(LineSeries::new(
                series(|t| t.allowed),
                GREEN.stroke_width(2),
            ))?
            .label("allowed")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], GREEN.stroke_width(2)));
        chart
            .draw_series(LineSeries::new(series(|t| t.denied), RED.stroke_width(2)))?
            .label("denied")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], RED.stroke_width(2)));
        chart
            .draw_series(LineSeries::new(series(|t| t.errors), BLACK.stroke_width(1)))?
            .label("errors")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLACK));
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperRight)
            .draw()?;

        let max_p99 = timeline
            .iter()
            .map(|t| t.p99_ms)
            .fold(0.0_f64, f64::max)
            .max(0.001);
        let mut latency = ChartBuilder::on(&bottom)
            .margin(12)
            .x_label_area_size(30)
            .y_label_area_size(70)
            .build_cartesian_2d(0u32..seconds, 0.0..max_p99 * 1.15)?;
        latency
            .configure_mesh()
            .x_desc("second")
            .y_desc("p99 latency (ms)")
            .draw()?;
        latency
            .draw_series(LineSeries::new(
                timeline.iter().map(|t| (t.second as u32, t.p99_ms)),
                BLUE.stroke_width(2),
            ))?
            .label("p99")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLUE.stroke_width(2)));
        latency
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()?;
        root.present()?;
    }
    Ok(out)
}

fn png(svg: &str, path: &Path) -> anyhow::Result<()> {
    use resvg::{tiny_skia, usvg};
    let mut options = usvg::Options::default();
    let fonts = options.fontdb_mut();
    fonts.load_system_fonts();
    // The SVG asks for "sans-serif"; map it to a face this machine has.
    let family = ["DejaVu Sans", "Liberation Sans", "Noto Sans", "FreeSans"]
        .into_iter()
        .find(|f| {
            fonts
                .faces()
                .any(|face| face.families.iter().any(|(n, _)| n == f))
        })
        .map(str::to_string)
        .or_else(|| {
            fonts
                .faces()
                .next()
                .and_then(|f| f.families.first().map(|(n, _)| n.clone()))
        });
    if let Some(family) = family {
        fonts.set_sans_serif_family(family);
    }
    let tree = usvg::Tree::from_str(svg, &options).context("rendering the plot")?;
    let size = tree.size().to_int_size();
    let mut pixmap =
        tiny_skia::Pixmap::new(size.width(), size.height()).context("allocating the plot image")?;
    resvg::render(&tree, tiny_skia::Transform::default(), &mut pixmap.as_mut());
    pixmap
        .save_png(path)
        .with_context(|| format!("{}", path.display()))
}
