//! The `--svg` plot: one panel per strategy, mean in-flight requests per backend over virtual
//! time, one line per backend, the pool events marked.

use std::path::Path;

use plotters::prelude::*;

use super::{Error, Report};

/// Width of the image, and height of one panel, in pixels.
const WIDTH: u32 = 900;
const PANEL_HEIGHT: u32 = 260;

/// Line colours (Tableau 10): distinct, and none too pale on white; more backends reuse them.
const COLORS: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

/// Draws `report` as an SVG document.
pub fn render(report: &Report) -> Result<String, Error> {
    let mut svg = String::new();
    let panels = report.runs.len().max(1);
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, PANEL_HEIGHT * panels as u32))
            .into_drawing_area();
        root.fill(&WHITE).map_err(plot_error)?;
        let areas = root.split_evenly((panels, 1));
        for (run, area) in report.runs.iter().zip(&areas) {
            let step = run.series.step_s;
            let top = run
                .series
                .in_flight
                .iter()
                .flatten()
                .copied()
                .fold(1.0, f64::max)
                * 1.15;
            let mut title = run.strategy.to_owned();
            if let Some(fallback) = run.fallback {
                title += &format!(" (new clients: {fallback})");
            }
            if let Some(factor) = run.balance_factor {
                title += &format!(", balance_factor {factor}");
            }
            if let (Some(load), Some(requests)) = (run.imbalance.in_flight, run.imbalance.requests)
            {
                title += &format!(" — imbalance: in flight {load:.2}, requests {requests:.2}");
            }
            let mut chart = ChartBuilder::on(area)
                .caption(title, ("sans-serif", 15))
                .margin(8)
                .x_label_area_size(32)
                .y_label_area_size(44)
                .build_cartesian_2d(0f64..report.workload.duration_s, 0f64..top)
                .map_err(plot_error)?;
            chart
                .configure_mesh()
                .x_desc("virtual time (s)")
                .y_desc("requests in flight")
                .max_light_lines(0)
                .x_label_formatter(&|x| format!("{x:.0}"))
                .y_label_formatter(&|y| format!("{y:.0}"))
                .bold_line_style(RGBColor(225, 225, 225))
                .draw()
                .map_err(plot_error)?;
            for (i, (backend, series)) in run.backends.iter().zip(&run.series.in_flight).enumerate()
            {
                let color = COLORS[i % COLORS.len()];
                let points = series
                    .iter()
                    .enumerate()
                    .map(|(k, &y)| ((k as f64 + 0.5) * step, y));
                chart
                    .draw_series(LineSeries::new(points, color.stroke_width(2)))
                    .map_err(plot_error)?
                    .label(format!("{} (weight {})", backend.address, backend.weight))
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
                    });
            }
            for event in &report.events {
                let at = event.at_s;
                chart
                    .draw_series(DashedLineSeries::new(
                        vec![(at, 0.0), (at, top)],
                        6,
                        4,
                        BLACK.stroke_width(1),
                    ))
                    .map_err(plot_error)?;
                chart
                    .draw_series(std::iter::once(Text::new(
                        format!(" {} {}", event.kind.as_str(), event.address),
                        (at, top * 0.98),
                        ("sans-serif", 12),
                    )))
                    .map_err(plot_error)?;
            }
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperLeft)
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .label_font(("sans-serif", 12))
                .draw()
                .map_err(plot_error)?;
        }
        root.present().map_err(plot_error)?;
    }
    Ok(svg)
}

/// Draws `report` into the file at `path`.
pub fn write(report: &Report, path: &Path) -> Result<(), Error> {
    let svg = render(report)?;
    std::fs::write(path, svg).map_err(|source| Error::Write {
        path: path.to_owned(),
        source,
    })
}

fn plot_error<E: std::error::Error + Send + Sync + 'static>(error: E) -> Error {
    Error::Plot(Box::new(error))
}
