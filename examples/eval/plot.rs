//! Pictures of an evaluation run, in SVG and PNG: a needle heatmap per task
//! and mode (depth x length, colour = score) and accuracy against length
//! per task, one line per mode.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};
use qllm::eval::Task;

use crate::Cell;

const SIZE: (u32, u32) = (900, 560);
const MODE_ORDER: [&str; 4] = ["qllm", "infllm", "streaming", "dense"];

/// Draws every picture for `cells` into `out`; returns the files written.
pub fn render(out: &Path, cells: &[Cell]) -> Result<Vec<PathBuf>> {
    register_system_font()?;
    let mut written = Vec::new();
    let tasks: BTreeSet<Task> = cells.iter().map(|c| c.task).collect();
    for task in tasks {
        let of_task: Vec<&Cell> = cells.iter().filter(|c| c.task == task).collect();
        let lengths: Vec<usize> = of_task
            .iter()
            .map(|c| c.length)
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let modes: Vec<String> = MODE_ORDER
            .iter()
            .map(|m| (*m).to_string())
            .filter(|m| of_task.iter().any(|c| c.mode.to_string() == *m))
            .collect();
        for mode in &modes {
            let grid = Grid::new(of_task.iter().filter(|c| c.mode.to_string() == *mode));
            let title = format!("{} - {mode}", task.name());
            let stem = out.join(format!("heatmap-{}-{mode}", task.name()));
            written.extend(both(&stem, |p| p.heatmap(&title, &grid))?);
        }
        let lines: Vec<(String, Vec<Option<f64>>)> = modes
            .iter()
            .map(|mode| {
                let means = lengths
                    .iter()
                    .map(|&l| {
                        mean(
                            of_task
                                .iter()
                                .filter(|c| c.length == l && c.mode.to_string() == *mode)
                                .map(|c| c.score),
                        )
                    })
                    .collect();
                (mode.clone(), means)
            })
            .collect();
        let title = format!("{}: accuracy against context length", task.name());
        let stem = out.join(format!("accuracy-{}", task.name()));
        written.extend(both(&stem, |p| p.accuracy(&title, &lengths, &lines))?);
    }
    Ok(written)
}

/// Draws one picture as `stem.svg` and `stem.png`.
fn both(stem: &Path, draw: impl Fn(&mut dyn Painter) -> Result<()>) -> Result<[PathBuf; 2]> {
    let svg = stem.with_extension("svg");
    let png = stem.with_extension("png");
    {
        let root = SVGBackend::new(&svg, SIZE).into_drawing_area();
        draw(&mut Area(root))?;
    }
    {
        let root = BitMapBackend::new(&png, SIZE).into_drawing_area();
        draw(&mut Area(root))?;
    }
    Ok([svg, png])
}

/// The drawing calls the pictures need, over any backend.
trait Painter {
    fn heatmap(&mut self, title: &str, grid: &Grid) -> Result<()>;
    fn accuracy(
        &mut self,
        title: &str,
        lengths: &[usize],
        lines: &[(String, Vec<Option<f64>>)],
    ) -> Result<()>;
}

struct Area<DB: DrawingBackend>(DrawingArea<DB, Shift>);

/// Mean score per (length, depth) of one task and mode.
struct Grid {
    lengths: Vec<usize>,
    /// Depths in per mille, ascending.
    depths: Vec<u32>,
    cells: BTreeMap<(usize, u32), (f64, bool)>,
}

impl Grid {
    fn new<'a>(cells: impl Iterator<Item = &'a &'a Cell>) -> Self {
        let mut sums: BTreeMap<(usize, u32), (f64, usize, bool)> = BTreeMap::new();
        for c in cells {
            let key = c.key();
            let e = sums.entry((c.length, key.depth_per_mille)).or_default();
            e.0 += c.score;
            e.1 += 1;
            e.2 |= c.error.is_some();
        }
        #[allow(clippy::cast_precision_loss)]
        let cells: BTreeMap<(usize, u32), (f64, bool)> = sums
            .into_iter()
            .map(|(k, (sum, n, error))| (k, (sum / n as f64, error)))
            .collect();
        Grid {
            lengths: cells
                .keys()
                .map(|k| k.0)
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect(),
            depths: cells
                .keys()
                .map(|k| k.1)
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect(),
            cells,
        }
    }
}

fn mean(values: impl Iterator<Item = f64>) -> Option<f64> {
    let (sum, n) = values.fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    #[allow(clippy::cast_precision_loss)]
    let mean = (n > 0).then(|| sum / n as f64);
    mean
}

fn length_label(tokens: usize) -> String {
    if tokens >= 1024 && tokens.is_multiple_of(1024) {
        format!("{}K", tokens / 1024)
    } else {
        tokens.to_string()
    }
}

/// Red (0) through yellow (0.5) to green (1).
fn score_colour(score: f64) -> RGBColor {
    let lerp = |a: u8, b: u8, t: f64| {
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let v = (f64::from(a) + (f64::from(b) - f64::from(a)) * t).round() as u8;
        v
    };
    let s = score.clamp(0.0, 1.0);
    let (from, to, t) = if s < 0.5 {
        ((215, 48, 39), (254, 224, 139), s * 2.0)
    } else {
        ((254, 224, 139), (26, 152, 80), s * 2.0 - 1.0)
    };
    RGBColor(
        lerp(from.0, to.0, t),
        lerp(from.1, to.1, t),
        lerp(from.2, to.2, t),
    )
}

fn mode_colour(mode: &str) -> RGBColor {
    match mode {
        "qllm" => RGBColor(31, 119, 180),
        "infllm" => RGBColor(255, 127, 14),
        "streaming" => RGBColor(44, 160, 44),
        _ => RGBColor(90, 90, 90),
    }
}

fn drawing(e: impl std::fmt::Debug) -> anyhow::Error {
    anyhow!("drawing failed: {e:?}")
}

impl<DB: DrawingBackend> Painter for Area<DB> {
    fn heatmap(&mut self, title: &str, grid: &Grid) -> Result<()> {
        let root = &self.0;
        root.fill(&WHITE).map_err(drawing)?;
        let nx = i32::try_from(grid.lengths.len())?;
        let ny = i32::try_from(grid.depths.len())?;
        let mut chart = ChartBuilder::on(root)
            .caption(title, ("sans-serif", 24))
            .margin(16)
            .x_label_area_size(50)
            .y_label_area_size(70)
            .build_cartesian_2d(0..nx, 0..ny)
            .map_err(drawing)?;
        let (w, h) = chart.plotting_area().dim_in_pixel();
        let (cell_w, cell_h) = (i32::try_from(w)? / nx.max(1), i32::try_from(h)? / ny.max(1));
        // Depth 0% at the top, as needle heatmaps are drawn.
        let row = |j: usize| ny - 1 - i32::try_from(j).unwrap_or(0);
        chart
            .configure_mesh()
            .disable_mesh()
            .x_labels(grid.lengths.len() + 1)
            .y_labels(grid.depths.len() + 1)
            .x_label_offset(cell_w / 2)
            .y_label_offset(-cell_h / 2)
            .x_label_formatter(&|x| {
                usize::try_from(*x)
                    .ok()
                    .and_then(|i| grid.lengths.get(i))
                    .map(|l| length_label(*l))
                    .unwrap_or_default()
            })
            .y_label_formatter(&|y| {
                usize::try_from(ny - 1 - *y)
                    .ok()
                    .and_then(|j| grid.depths.get(j))
                    .map(|d| format!("{:.0}%", f64::from(*d) / 10.0))
                    .unwrap_or_default()
            })
            .x_desc("context length (tokens)")
            .y_desc("needle depth")
            .label_style(("sans-serif", 16))
            .draw()
            .map_err(drawing)?;
        for (i, length) in grid.lengths.iter().enumerate() {
            for (j, depth) in grid.depths.iter().enumerate() {
                let x = i32::try_from(i)?;
                let y = row(j);
                let (fill, text) = match grid.cells.get(&(*length, *depth)) {
                    Some((_, true)) => (RGBColor(160, 160, 160), "error".to_string()),
                    Some((score, false)) => (score_colour(*score), format!("{score:.2}")),
                    None => (RGBColor(235, 235, 235), "-".to_string()),
                };
                chart
                    .draw_series(std::iter::once(Rectangle::new(
                        [(x, y), (x + 1, y + 1)],
                        fill.filled(),
                    )))
                    .map_err(drawing)?;
                chart
                    .draw_series(std::iter::once(
                        EmptyElement::at((x, y + 1))
                            + Text::new(
                                text,
                                (cell_w / 2 - 16, cell_h / 2 - 8),
                                ("sans-serif", 15).into_font().color(&BLACK),
                            ),
                    ))
                    .map_err(drawing)?;
            }
        }
        root.present().map_err(drawing)?;
        Ok(())
    }

    fn accuracy(
        &mut self,
        title: &str,
        lengths: &[usize],
        lines: &[(String, Vec<Option<f64>>)],
    ) -> Result<()> {
        let root = &self.0;
        root.fill(&WHITE).map_err(drawing)?;
        #[allow(clippy::cast_precision_loss)]
        let right = lengths.len() as f64 - 0.5;
        let mut chart = ChartBuilder::on(root)
            .caption(title, ("sans-serif", 24))
            .margin(16)
            .x_label_area_size(50)
            .y_label_area_size(60)
            .build_cartesian_2d(-0.5..right, 0.0..1.05)
            .map_err(drawing)?;
        chart
            .configure_mesh()
            .x_labels(lengths.len() * 2 + 1)
            .x_label_formatter(&|x| {
                let i = x.round();
                if (x - i).abs() > 1e-6 || i < 0.0 {
                    return String::new();
                }
                #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
                let i = i as usize;
                lengths.get(i).map(|l| length_label(*l)).unwrap_or_default()
            })
            .y_label_formatter(&|y| format!("{y:.1}"))
            .x_desc("context length (tokens)")
            .y_desc("mean score")
            .label_style(("sans-serif", 16))
            .draw()
            .map_err(drawing)?;
        for (mode, means) in lines {
            let colour = mode_colour(mode);
            #[allow(clippy::cast_precision_loss)]
            let points: Vec<(f64, f64)> = means
                .iter()
                .enumerate()
                .filter_map(|(i, m)| m.map(|m| (i as f64, m)))
                .collect();
            chart
                .draw_series(LineSeries::new(points.clone(), colour.stroke_width(3)))
                .map_err(drawing)?
                .label(mode.as_str())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(3))
                });
            chart
                .draw_series(
                    points
                        .into_iter()
                        .map(|p| Circle::new(p, 5, colour.filled())),
                )
                .map_err(drawing)?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerLeft)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font(("sans-serif", 16))
            .draw()
            .map_err(drawing)?;
        root.present().map_err(drawing)?;
        Ok(())
    }
}

/// Text needs a TrueType font: `QLLM_FONT`, else DejaVu Sans or the first
/// `.ttf` under the system font folders.
fn register_system_font() -> Result<()> {
    let path = std::env::var_os("QLLM_FONT")
        .map(PathBuf::from)
        .or_else(|| {
            let dejavu = PathBuf::from("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf");
            dejavu.exists().then_some(dejavu)
        })
        .or_else(|| {
            [
                "/usr/share/fonts",
                "/usr/local/share/fonts",
                "/Library/Fonts",
            ]
            .iter()
            .find_map(|dir| first_ttf(Path::new(dir)))
        })
        .context(
            "no TrueType font found for the pictures' text: set QLLM_FONT to a .ttf file \
             (Debian: apt install fonts-dejavu-core)",
        )?;
    let bytes = std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
    // plotters keeps fonts for the whole process.
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    register_font("sans-serif", FontStyle::Normal, bytes)
        .map_err(|_| anyhow!("{} is not a usable TrueType font", path.display()))
}

fn first_ttf(dir: &Path) -> Option<PathBuf> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    entries.sort();
    entries.iter().find_map(|p| {
        if p.is_dir() {
            first_ttf(p)
        } else {
            p.extension().is_some_and(|e| e == "ttf").then(|| p.clone())
        }
    })
}
