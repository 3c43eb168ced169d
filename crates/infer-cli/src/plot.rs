//! The loss curve of a training run as an SVG image (plotters' SVG
//! backend): training loss at each report, validation loss at each
//! validation, against the step.

use std::path::Path;

use inference_core::TrainProgress;
use plotters::prelude::*;

use crate::error::CliError;

/// The file the curve is written to, beside the adapter.
pub const LOSS_PLOT: &str = "loss.svg";

/// The SVG text of `reports`' training and validation losses; `None` when
/// they hold no loss to draw.
pub fn loss_svg(reports: &[TrainProgress]) -> Result<Option<String>, CliError> {
    let finite = |l: Option<f32>| l.filter(|l| l.is_finite());
    let train: Vec<(f64, f64)> = reports
        .iter()
        .filter_map(|r| finite(r.train_loss).map(|l| (r.step as f64, f64::from(l))))
        .collect();
    let valid: Vec<(f64, f64)> = reports
        .iter()
        .filter_map(|r| finite(r.val_loss).map(|l| (r.step as f64, f64::from(l))))
        .collect();
    let all = || train.iter().chain(&valid);
    if all().next().is_none() {
        return Ok(None);
    }
    let (x0, x1) = all().fold((f64::MAX, f64::MIN), |(lo, hi), p| {
        (lo.min(p.0), hi.max(p.0))
    });
    let (y0, y1) = all().fold((f64::MAX, f64::MIN), |(lo, hi), p| {
        (lo.min(p.1), hi.max(p.1))
    });
    let pad = ((y1 - y0) * 0.05).max(1e-3);
    let x1 = if x1 > x0 { x1 } else { x0 + 1.0 };
    let plot_error =
        |e: &dyn std::fmt::Display| CliError::Input(format!("drawing the loss plot: {e}"));
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (800, 480)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| plot_error(&e))?;
        let mut chart = ChartBuilder::on(&root)
            .caption("Loss", ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(56)
            .build_cartesian_2d(x0..x1, (y0 - pad).max(0.0)..y1 + pad)
            .map_err(|e| plot_error(&e))?;
        chart
            .configure_mesh()
            .x_desc("step")
            .y_desc("loss")
            .draw()
            .map_err(|e| plot_error(&e))?;
        for (points, colour, label) in [(&train, BLUE, "train"), (&valid, RED, "validation")] {
            if points.is_empty() {
                continue;
            }
            chart
                .draw_series(LineSeries::new(
                    points.iter().copied(),
                    colour.stroke_width(2),
                ))
                .map_err(|e| plot_error(&e))?
                .label(label)
                .legend(move |(x, y)| {
                    PathElement::new([(x, y), (x + 20, y)], colour.stroke_width(2))
                });
            chart
                .draw_series(points.iter().map(|&p| Circle::new(p, 3, colour.filled())))
                .map_err(|e| plot_error(&e))?;
        }
        chart
            .configure_series_labels()
            .border_style(BLACK)
            .background_style(WHITE.mix(0.8))
            .draw()
            .map_err(|e| plot_error(&e))?;
        root.present().map_err(|e| plot_error(&e))?;
    }
    Ok(Some(svg))
}

/// Writes `reports`' curve to `dir/loss.svg` (nothing when there is no
/// loss); the path written.
pub fn write_loss_plot(
    dir: &Path,
    reports: &[TrainProgress],
) -> Result<Option<std::path::PathBuf>, CliError> {
    let Some(svg) = loss_svg(reports)? else {
        return Ok(None);
    };
    let path = dir.join(LOSS_PLOT);
    inference_formats::write::write_atomic(&path, svg.as_bytes())
        .map_err(|(path, source)| inference_core::Error::Write { path, source })?;
    Ok(Some(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(step: usize, train: Option<f32>, val: Option<f32>) -> TrainProgress {
        TrainProgress {
            step,
            iters: 20,
            train_loss: train,
            val_loss: val,
            learning_rate: 1e-3,
            tokens_per_sec: 1.0,
            trained_tokens: 0,
            peak_memory_bytes: 0,
        }
    }

    #[test]
    fn both_curves_are_drawn_and_an_empty_run_draws_nothing() {
        let reports = [
            report(0, None, Some(4.0)),
            report(10, Some(3.0), None),
            report(20, Some(2.0), Some(2.5)),
        ];
        let svg = loss_svg(&reports).unwrap().unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..40]);
        for text in ["train", "validation", "step", "loss"] {
            assert!(svg.contains(text), "{text} missing");
        }
        // A line per curve (two points each at least), plus the legend's.
        assert!(svg.matches("<polyline").count() >= 2, "{svg}");
        assert!(loss_svg(&[report(5, None, None)]).unwrap().is_none());
        assert!(loss_svg(&[report(5, Some(f32::NAN), None)])
            .unwrap()
            .is_none());
    }
}
