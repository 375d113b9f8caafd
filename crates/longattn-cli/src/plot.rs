//! PNG plots with plotters' bitmap backend and an embedded font (DejaVu Sans Mono, see
//! `assets/DejaVu-LICENSE.txt`): no fontconfig or other system library is needed to build or run.
use anyhow::{anyhow, Result};
use plotters::prelude::*;
use plotters::style::FontStyle;
use std::path::Path;
use std::sync::Once;

static FONT: &[u8] = include_bytes!("../assets/DejaVuSansMono.ttf");
const FAMILY: &str = "sans-serif";

fn init_fonts() -> Result<()> {
    static INIT: Once = Once::new();
    let mut ok = true;
    INIT.call_once(|| {
        for style in [FontStyle::Normal, FontStyle::Bold] {
            ok &= plotters::style::register_font(FAMILY, style, FONT).is_ok();
        }
    });
    if ok {
        Ok(())
    } else {
        Err(anyhow!("the embedded font could not be loaded"))
    }
}

type Plot = std::result::Result<(), Box<dyn std::error::Error>>;

fn wrap(path: &Path, r: Plot) -> Result<()> {
    r.map_err(|e| anyhow!("{}: cannot draw the plot: {e}", path.display()))
}

/// One line per series; x is log2 of the sequence length, labelled as the length.
pub fn line_plot(path: &Path, title: &str, series: &[(String, Vec<(usize, f64)>)]) -> Result<()> {
    init_fonts()?;
    wrap(path, line_plot_inner(path, title, series))
}

fn line_plot_inner(path: &Path, title: &str, series: &[(String, Vec<(usize, f64)>)]) -> Plot {
    let root = BitMapBackend::new(path, (960, 600)).into_drawing_area();
    root.fill(&WHITE)?;
    let pts = series.iter().flat_map(|s| s.1.iter());
    let (mut x0, mut x1, mut y1) = (f64::MAX, f64::MIN, 0.0f64);
    for &(n, y) in pts {
        let x = (n as f64).log2();
        x0 = x0.min(x);
        x1 = x1.max(x);
        y1 = y1.max(y);
    }
    if x0 > x1 {
        (x0, x1) = (0.0, 1.0);
    }
    let y1 = if y1 > 0.0 { y1 * 1.2 } else { 1.0 };
    let mut chart = ChartBuilder::on(&root)
        .caption(title, (FAMILY, 22))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d(x0 - 0.4..x1 + 0.4, 0.0..y1)?;
    let labels = (x1 - x0).round() as usize + 1;
    chart
        .configure_mesh()
        .x_desc("sequence length")
        .y_desc("useful GFLOP/s")
        .x_labels(labels.max(2) * 2)
        .x_label_formatter(&|x| {
            if (x - x.round()).abs() < 1e-6 {
                crate::common::fmt_len(2f64.powf(*x).round() as usize)
            } else {
                String::new()
            }
        })
        .label_style((FAMILY, 14))
        .draw()?;
    for (i, (name, pts)) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let xy: Vec<(f64, f64)> = pts.iter().map(|&(n, y)| ((n as f64).log2(), y)).collect();
        chart
            .draw_series(LineSeries::new(xy.clone(), color.stroke_width(2)))?
            .label(name.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        chart.draw_series(xy.iter().map(|&p| Circle::new(p, 4, color.filled())))?;
    }
    chart
        .configure_series_labels()
        .label_font((FAMILY, 14))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()?;
    root.present()?;
    Ok(())
}

/// The tile schedule: one cell per (query tile, key tile), 0 empty / 1 full / 2 partial.
pub fn tile_grid_png(path: &Path, title: &str, grid: &[Vec<u8>]) -> Result<()> {
    init_fonts()?;
    wrap(path, tile_grid_inner(path, title, grid))
}

fn tile_grid_inner(path: &Path, title: &str, grid: &[Vec<u8>]) -> Plot {
    let rows = grid.len().max(1);
    let cols = grid.first().map_or(1, |r| r.len()).max(1);
    let cell = (768 / rows.max(cols)).clamp(1, 48) as i32;
    let (gw, gh) = (cell * cols as i32, cell * rows as i32);
    let (left, top) = (40i32, 56i32);
    let w = (gw + 2 * left).max(560) as u32;
    let h = (gh + top + 64) as u32;
    let root = BitMapBackend::new(path, (w, h)).into_drawing_area();
    root.fill(&WHITE)?;
    let empty = RGBColor(235, 235, 235);
    let full = RGBColor(31, 119, 180);
    let partial = RGBColor(255, 127, 14);
    root.draw(&Text::new(
        title.to_string(),
        (left, 16),
        (FAMILY, 18).into_font(),
    ))?;
    for (r, row) in grid.iter().enumerate() {
        for (c, &v) in row.iter().enumerate() {
            let color = match v {
                1 => full,
                2 => partial,
                _ => empty,
            };
            let x = left + c as i32 * cell;
            let y = top + r as i32 * cell;
            root.draw(&Rectangle::new(
                [(x, y), (x + cell, y + cell)],
                color.filled(),
            ))?;
        }
    }
    root.draw(&Rectangle::new(
        [(left, top), (left + gw, top + gh)],
        BLACK.stroke_width(1),
    ))?;
    let counts = |k: u8| grid.iter().flatten().filter(|&&v| v == k).count();
    let ly = top + gh + 20;
    let mut x = left;
    for (name, color, k) in [
        ("full", full, 1u8),
        ("partial", partial, 2),
        ("empty", empty, 0),
    ] {
        root.draw(&Rectangle::new(
            [(x, ly), (x + 16, ly + 16)],
            color.filled(),
        ))?;
        root.draw(&Rectangle::new(
            [(x, ly), (x + 16, ly + 16)],
            BLACK.stroke_width(1),
        ))?;
        let label = format!("{name} ({})", counts(k));
        root.draw(&Text::new(label, (x + 22, ly), (FAMILY, 15).into_font()))?;
        x += 170;
    }
    root.draw(&Text::new(
        "rows: query tiles, columns: key tiles".to_string(),
        (left, ly + 22),
        (FAMILY, 12).into_font(),
    ))?;
    root.present()?;
    Ok(())
}

/// A heat map of values in [0, 1] (white 0 -> blue 1), one labelled row per `rows` entry, one
/// column per `cols` entry, the value printed in each cell.
pub fn heat_map_png(
    path: &Path,
    title: &str,
    row_label: &str,
    col_label: &str,
    rows: &[String],
    cols: &[String],
    values: &[Vec<f64>],
) -> Result<()> {
    init_fonts()?;
    wrap(
        path,
        heat_map_inner(path, title, row_label, col_label, rows, cols, values),
    )
}

fn heat_map_inner(
    path: &Path,
    title: &str,
    row_label: &str,
    col_label: &str,
    rows: &[String],
    cols: &[String],
    values: &[Vec<f64>],
) -> Plot {
    let cell = 72i32;
    let (left, top) = (120i32, 70i32);
    let (gw, gh) = (cell * cols.len() as i32, cell * rows.len() as i32);
    let w = (gw + left + 40).max(560) as u32;
    let h = (gh + top + 60) as u32;
    let root = BitMapBackend::new(path, (w, h)).into_drawing_area();
    root.fill(&WHITE)?;
    root.draw(&Text::new(
        title.to_string(),
        (16, 12),
        (FAMILY, 18).into_font(),
    ))?;
    root.draw(&Text::new(
        format!("rows: {row_label}, columns: {col_label}"),
        (16, 40),
        (FAMILY, 13).into_font(),
    ))?;
    for (r, row) in values.iter().enumerate() {
        root.draw(&Text::new(
            rows[r].clone(),
            (16, top + r as i32 * cell + cell / 2 - 8),
            (FAMILY, 15).into_font(),
        ))?;
        for (c, &v) in row.iter().enumerate() {
            let t = v.clamp(0.0, 1.0);
            // White (0) to blue (1).
            let color = RGBColor(
                (255.0 - t * (255.0 - 31.0)) as u8,
                (255.0 - t * (255.0 - 119.0)) as u8,
                (255.0 - t * (255.0 - 180.0)) as u8,
            );
            let (x, y) = (left + c as i32 * cell, top + r as i32 * cell);
            root.draw(&Rectangle::new(
                [(x, y), (x + cell, y + cell)],
                color.filled(),
            ))?;
            root.draw(&Rectangle::new(
                [(x, y), (x + cell, y + cell)],
                BLACK.stroke_width(1),
            ))?;
            root.draw(&Text::new(
                format!("{v:.2}"),
                (x + cell / 2 - 18, y + cell / 2 - 8),
                (FAMILY, 15).into_font(),
            ))?;
        }
    }
    for (c, name) in cols.iter().enumerate() {
        root.draw(&Text::new(
            name.clone(),
            (left + c as i32 * cell + cell / 2 - 18, top + gh + 8),
            (FAMILY, 14).into_font(),
        ))?;
    }
    root.present()?;
    Ok(())
}
