//! The chart kinds of the report (lines, bars, heatmaps, scatter plots) as SVG, and their PNG.

use std::collections::BTreeMap;
use std::path::Path;

use plotters::prelude::*;

pub type Res<T> = Result<T, Box<dyn std::error::Error>>;
/// A named line: (x, y) points.
pub type Series = (String, Vec<(f64, f64)>);
/// A bar series: name, one value per category, one (low, high) range per category.
pub type BarSeries = (String, Vec<f64>, Vec<(f64, f64)>);
/// Mean, min and max over repeats, per key.
pub type Spread = BTreeMap<String, (f64, f64, f64)>;

/// Matplotlib's `tab10`, then two darker ones: qualitative colours that stay apart on white.
const PALETTE: [RGBColor; 12] = [
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0xff, 0x7f, 0x0e),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0x94, 0x67, 0xbd),
    RGBColor(0x8c, 0x56, 0x4b),
    RGBColor(0xe3, 0x77, 0xc2),
    RGBColor(0x7f, 0x7f, 0x7f),
    RGBColor(0xbc, 0xbd, 0x22),
    RGBColor(0x17, 0xbe, 0xcf),
    RGBColor(0x39, 0x3b, 0x79),
    RGBColor(0x63, 0x79, 0x39),
];

/// The `i`-th colour of the palette (series that are not policies).
pub(super) fn color(i: usize) -> RGBColor {
    PALETTE.get(i % PALETTE.len()).copied().unwrap_or(BLACK)
}

/// The range bars' colour: visible on the default's black bars and on white.
const ERROR_BAR: RGBColor = RGBColor(0x99, 0x99, 0x99);

/// How a series is drawn.
#[derive(Debug, Clone, Copy)]
pub(super) struct Style {
    pub color: RGBColor,
    /// Line width (the default policy's is heavier).
    pub width: u32,
    /// A peer router: dashed lines, hollow bars.
    pub peer: bool,
    /// The series is a policy or a peer's (its colour is its own in every figure).
    pub policy: bool,
}

impl Style {
    /// A bar's fill: a peer's pale (its outline in the full colour).
    fn fill(&self) -> ShapeStyle {
        if self.peer {
            self.color.mix(0.35).filled()
        } else {
            self.color.filled()
        }
    }
}

/// Each policy's colour, the same in every figure: the default in black, kvroute's and the
/// reference policies from the palette, and a peer router's policy in the colour of kvroute's
/// rule of the same kind, dashed (SMG `cache_aware` as `sglang_cache_aware`, `round_robin` as
/// `round_robin`, `power_of_two` as `p2c`, `prefix_hash` as `prefix_key`; Dynamo's `kv` as
/// `dynamo_cost`, its `round-robin` as `round_robin`). Series that are not policies take the
/// palette in order.
pub(super) fn style(name: &str, i: usize) -> Style {
    let peer_policy = |router: &str| {
        name.strip_prefix(router)
            .and_then(|r| r.split_once('/'))
            .map(|(_, p)| p)
    };
    let (peer, policy) = match (peer_policy("smg-"), peer_policy("dynamo-")) {
        (Some(p), _) => (
            true,
            match p {
                "cache_aware" => "sglang_cache_aware",
                "power_of_two" => "p2c",
                "prefix_hash" => "prefix_key",
                other => other,
            },
        ),
        (None, Some(p)) => (
            true,
            match p {
                "kv" => "dynamo_cost",
                "round-robin" => "round_robin",
                other => other,
            },
        ),
        (None, None) => (false, name),
    };
    let slot = match policy {
        "session_hash" => Some(0),
        "prefix_key" => Some(1),
        "load_cache_aware" => Some(2),
        "sglang_cache_aware" => Some(3),
        "llmd_scorer" => Some(4),
        "dynamo_cost" => Some(5),
        "chwbl" => Some(6),
        "round_robin" => Some(7),
        "jsq" => Some(8),
        "p2c" => Some(9),
        "dualmap" => Some(10),
        "lmetric" => Some(11),
        _ => None,
    };
    let default = kvroute_core::PolicySettings::default().policy.as_str() == policy;
    Style {
        color: match (default, slot) {
            (true, _) => BLACK,
            (false, Some(s)) => color(s),
            (false, None) => color(i % PALETTE.len()),
        },
        width: if default { 3 } else { 2 },
        peer,
        policy: default || slot.is_some(),
    }
}

/// The legend, beside the plot (never over the data): one row per series, with its swatch.
pub(super) fn legend<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    entries: &[(String, Style)],
    bars: bool,
) -> Res<()>
where
    DB::ErrorType: 'static,
{
    let font = ("sans-serif", 12).into_font();
    for (k, (name, s)) in entries.iter().enumerate() {
        let y = 48 + 18 * k as i32;
        if bars {
            area.draw(&Rectangle::new([(4, y - 5), (18, y + 5)], s.fill()))?;
            area.draw(&Rectangle::new(
                [(4, y - 5), (18, y + 5)],
                s.color.stroke_width(1),
            ))?;
        } else if s.peer {
            area.draw(&PathElement::new(
                vec![(2, y), (8, y)],
                s.color.stroke_width(s.width),
            ))?;
            area.draw(&PathElement::new(
                vec![(13, y), (20, y)],
                s.color.stroke_width(s.width),
            ))?;
        } else {
            area.draw(&PathElement::new(
                vec![(2, y), (20, y)],
                s.color.stroke_width(s.width),
            ))?;
        }
        area.draw(&Text::new(name.clone(), (26, y - 7), font.clone()))?;
    }
    Ok(())
}

/// Each series' style, by name and position, and the width of the legend column beside the
/// figure (none for a single series).
fn styled<'a>(names: impl ExactSizeIterator<Item = &'a String>) -> (Vec<(String, Style)>, u32) {
    let single = names.len() < 2;
    let styles: Vec<(String, Style)> = names
        .enumerate()
        .map(|(i, name)| (name.clone(), style(name, i)))
        .collect();
    let longest = styles.iter().map(|(n, _)| n.len()).max().unwrap_or(0) as u32;
    let side = if single || longest == 0 {
        0
    } else {
        40 + 7 * longest
    };
    (styles, side)
}

pub(super) fn range(vals: impl Iterator<Item = f64>, pad: f64) -> (f64, f64) {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for v in vals.filter(|v| v.is_finite()) {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    if hi - lo < 1e-9 {
        hi = lo + 1.0;
    }
    (lo - (hi - lo) * pad, hi + (hi - lo) * pad)
}

/// How figures are rendered to PNG: the system's fonts, with `sans-serif` mapped to one of them.
pub fn png_options() -> resvg::usvg::Options<'static> {
    let mut fonts = resvg::usvg::fontdb::Database::new();
    fonts.load_system_fonts();
    // The figures ask for the generic `sans-serif`, which fontdb maps to Arial unless told
    // otherwise: without Arial every label vanished from the PNGs. Map it to a sans face this
    // machine has (the bootstrap installs DejaVu where none is).
    if let Some(family) = sans_family(&fonts) {
        fonts.set_sans_serif_family(family);
    }
    resvg::usvg::Options {
        fontdb: std::sync::Arc::new(fonts),
        ..Default::default()
    }
}

/// An SVG figure as PNG bytes, at twice its size.
pub fn svg_to_png(svg: &[u8], opts: &resvg::usvg::Options<'_>) -> anyhow::Result<Vec<u8>> {
    let tree = resvg::usvg::Tree::from_data(svg, opts)?;
    let size = tree.size().to_int_size();
    let mut pixmap = resvg::tiny_skia::Pixmap::new(size.width() * 2, size.height() * 2)
        .ok_or_else(|| anyhow::anyhow!("empty figure"))?;
    resvg::render(
        &tree,
        resvg::tiny_skia::Transform::from_scale(2.0, 2.0),
        &mut pixmap.as_mut(),
    );
    Ok(pixmap.encode_png()?)
}

/// The family to draw `sans-serif` text with: DejaVu Sans, Liberation Sans or Noto Sans where
/// installed, else any family whose name says sans, else the first face's.
pub(super) fn sans_family(fonts: &resvg::usvg::fontdb::Database) -> Option<String> {
    let names: Vec<String> = fonts
        .faces()
        .flat_map(|f| f.families.iter().map(|(name, _)| name.clone()))
        .collect();
    ["DejaVu Sans", "Liberation Sans", "Noto Sans"]
        .iter()
        .find(|want| names.iter().any(|n| n == *want))
        .map(|s| (*s).to_string())
        .or_else(|| names.iter().find(|n| n.contains("Sans")).cloned())
        .or_else(|| names.first().cloned())
}

/// A tick label for `v` on an axis spanning `span`: no decimals past 10 ("900", not "900.0"),
/// then as many as the span needs.
pub(super) fn tick(v: f64, span: f64) -> String {
    let decimals = if span >= 10.0 {
        0
    } else if span >= 1.0 {
        1
    } else {
        2
    };
    format!("{v:.decimals$}")
}

/// A line chart of `series` (name, points) as SVG at `path`; `y0` starts the y axis at 0.
pub fn lines(path: &Path, title: &str, xl: &str, yl: &str, series: &[Series], y0: bool) -> Res<()> {
    lines_with(path, title, xl, yl, series, y0, false)
}

/// [`lines`] whose x values are log2 of the quantity: ticks at whole powers, labelled 2, 4, ... .
pub fn lines_log2x(
    path: &Path,
    title: &str,
    xl: &str,
    yl: &str,
    series: &[Series],
    y0: bool,
) -> Res<()> {
    lines_with(path, title, xl, yl, series, y0, true)
}

pub(super) fn lines_with(
    path: &Path,
    title: &str,
    xl: &str,
    yl: &str,
    series: &[Series],
    y0: bool,
    log2x: bool,
) -> Res<()> {
    let (styles, side) = styled(series.iter().map(|s| &s.0));
    let root = SVGBackend::new(path, (720 + side, 420)).into_drawing_area();
    root.fill(&WHITE)?;
    let (plot, key) = root.split_horizontally(720);
    let (x0, x1) = range(series.iter().flat_map(|s| s.1.iter().map(|p| p.0)), 0.02);
    let (ya, yb) = range(series.iter().flat_map(|s| s.1.iter().map(|p| p.1)), 0.05);
    let ya = if y0 { 0f64.min(ya) } else { ya };
    let mut c = ChartBuilder::on(&plot)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(x0..x1, ya..yb)?;
    let (xspan, yspan) = (x1 - x0, yb - ya);
    let xfmt = move |x: &f64| {
        if log2x {
            format!("{:.0}", x.exp2())
        } else {
            tick(*x, xspan)
        }
    };
    let yfmt = move |y: &f64| tick(*y, yspan);
    let mut mesh = c.configure_mesh();
    mesh.x_desc(xl)
        .y_desc(yl)
        .x_label_formatter(&xfmt)
        .y_label_formatter(&yfmt);
    if log2x {
        // One tick per power of two in range.
        mesh.x_labels((xspan.round() as usize).saturating_add(1).max(2));
    }
    mesh.draw()?;
    // The default last, so that it is drawn over the others.
    let mut order: Vec<usize> = (0..series.len()).collect();
    order.sort_by_key(|i| styles.get(*i).is_some_and(|s| s.1.width > 2));
    for i in order {
        let (Some((_, pts)), Some((_, s))) = (series.get(i), styles.get(i)) else {
            continue;
        };
        let line = s.color.stroke_width(s.width);
        if s.peer {
            c.draw_series(DashedLineSeries::new(pts.iter().copied(), 6, 4, line))?;
        } else {
            c.draw_series(LineSeries::new(pts.iter().copied(), line))?;
        }
        if pts.len() < 12 {
            c.draw_series(pts.iter().map(|p| Circle::new(*p, 3, s.color.filled())))?;
        }
    }
    if side > 0 {
        legend(&key, &styles, false)?;
    }
    root.present()?;
    Ok(())
}

/// Grouped bars: one group per category, one bar per series; optional (lo, hi) ranges and
/// horizontal reference lines per category.
pub(super) fn bars(
    path: &Path,
    title: &str,
    yl: &str,
    categories: &[String],
    series: &[BarSeries],
    refs: &[(usize, f64)],
) -> Res<()> {
    let (styles, side) = styled(series.iter().map(|s| &s.0));
    // Category names that would not fit side by side (policies) are written downwards, under a
    // plot as tall as it would be without them.
    let longest = categories.iter().map(String::len).max().unwrap_or(0) as u32;
    let rotate = categories.iter().map(|c| c.len() + 2).sum::<usize>() * 7 > 680;
    let labels = if rotate { 16 + 7 * longest } else { 40 };
    let root = SVGBackend::new(path, (760 + side, 380 + labels)).into_drawing_area();
    root.fill(&WHITE)?;
    let (plot, key) = root.split_horizontally(760);
    let n = series.len().max(1) as f64;
    let ymax = series
        .iter()
        .flat_map(|s| s.1.iter().copied().chain(s.2.iter().map(|r| r.1)))
        .chain(refs.iter().map(|r| r.1))
        .filter(|v| v.is_finite())
        .fold(0.0f64, f64::max)
        * 1.15;
    let mut c = ChartBuilder::on(&plot)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(labels)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..categories.len() as f64, 0f64..ymax.max(1e-9))?;
    let cats = categories.to_vec();
    let yspan = ymax.max(1e-9);
    c.configure_mesh()
        .disable_x_mesh()
        .y_label_formatter(&move |y| tick(*y, yspan))
        .x_labels(categories.len().max(1) * 2 + 1)
        .x_label_formatter(&move |x| {
            let i = x.floor() as usize;
            if (x - x.floor() - 0.5).abs() < 0.01 && !rotate {
                cats.get(i).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        })
        .y_desc(yl)
        .draw()?;
    // One series over categories that are policies: each bar in its policy's style.
    let per_category = series.len() == 1;
    for (si, ((_, vals, errs), (_, s))) in series.iter().zip(&styles).enumerate() {
        let w = 0.8 / n;
        let rect = |ci: usize, v: f64| {
            let x0 = ci as f64 + 0.1 + w * si as f64;
            [(x0, 0.0), (x0 + w * 0.9, v)]
        };
        for (ci, v) in vals.iter().enumerate() {
            let s = match categories.get(ci).map(|name| style(name, ci)) {
                Some(own) if per_category && own.policy => own,
                _ => *s,
            };
            c.draw_series(std::iter::once(Rectangle::new(rect(ci, *v), s.fill())))?;
            if s.peer {
                c.draw_series(std::iter::once(Rectangle::new(
                    rect(ci, *v),
                    s.color.stroke_width(1),
                )))?;
            }
        }
        c.draw_series(
            errs.iter()
                .enumerate()
                .filter(|(_, e)| e.0.is_finite())
                .map(|(ci, e)| {
                    let x = ci as f64 + 0.1 + w * si as f64 + w * 0.45;
                    PathElement::new(vec![(x, e.0), (x, e.1)], ERROR_BAR.stroke_width(1))
                }),
        )?;
    }
    for (ci, v) in refs {
        let x = *ci as f64;
        c.draw_series(std::iter::once(PathElement::new(
            vec![(x + 0.05, *v), (x + 0.95, *v)],
            BLACK.stroke_width(2),
        )))?;
    }
    if rotate {
        // Written downwards from just under the axis, each centred on its group.
        let font = ("sans-serif", 12)
            .into_font()
            .transform(FontTransform::Rotate90);
        for (ci, name) in categories.iter().enumerate() {
            let (px, py) = c.backend_coord(&(ci as f64 + 0.5, 0.0));
            root.draw(&Text::new(name.clone(), (px + 6, py + 8), font.clone()))?;
        }
    }
    if side > 0 {
        legend(&key, &styles, true)?;
    }
    root.present()?;
    Ok(())
}

pub(super) fn heatmap(
    path: &Path,
    title: &str,
    xs: &[f64],
    ys: &[f64],
    v: &BTreeMap<(usize, usize), f64>,
) -> Res<()> {
    let root = SVGBackend::new(path, (560, 480)).into_drawing_area();
    root.fill(&WHITE)?;
    let (lo, hi) = range(v.values().copied(), 0.0);
    let xl: Vec<f64> = xs.to_vec();
    let yl: Vec<f64> = ys.to_vec();
    let mut c = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(0f64..xs.len() as f64, 0f64..ys.len() as f64)?;
    c.configure_mesh()
        .disable_mesh()
        .x_labels(xs.len() * 2 + 1)
        .y_labels(ys.len() * 2 + 1)
        .x_label_formatter(&move |x| label_at(&xl, *x))
        .y_label_formatter(&move |y| label_at(&yl, *y))
        .x_desc("alpha (cache affinity)")
        .y_desc("beta (load)")
        .draw()?;
    for ((i, j), val) in v {
        let t = if hi > lo { (val - lo) / (hi - lo) } else { 0.0 };
        let col = RGBColor(
            (40.0 + 215.0 * t) as u8,
            (90.0 + 60.0 * (1.0 - t)) as u8,
            (230.0 * (1.0 - t)) as u8,
        );
        let (x, y) = (*i as f64, *j as f64);
        c.draw_series(std::iter::once(Rectangle::new(
            [(x, y), (x + 1.0, y + 1.0)],
            col.filled(),
        )))?;
        c.draw_series(std::iter::once(Text::new(
            format!("{val:.0}"),
            (x + 0.3, y + 0.55),
            ("sans-serif", 14).into_font().color(&WHITE),
        )))?;
    }
    root.present()?;
    Ok(())
}

pub(super) fn label_at(vals: &[f64], x: f64) -> String {
    if (x - x.floor() - 0.5).abs() < 0.01 {
        vals.get(x.floor() as usize)
            .map(|v| format!("{v}"))
            .unwrap_or_default()
    } else {
        String::new()
    }
}

pub(super) fn scatter(
    path: &Path,
    title: &str,
    xl: &str,
    yl: &str,
    pts: &[(String, f64, f64)],
) -> Res<()> {
    let root = SVGBackend::new(path, (640, 440)).into_drawing_area();
    root.fill(&WHITE)?;
    let (x0, x1) = range(pts.iter().map(|p| p.1), 0.1);
    let (y0, y1) = range(pts.iter().map(|p| p.2), 0.1);
    let mut c = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(x0..x1, y0..y1)?;
    let (xspan, yspan) = (x1 - x0, y1 - y0);
    c.configure_mesh()
        .x_desc(xl)
        .y_desc(yl)
        .x_label_formatter(&move |x| tick(*x, xspan))
        .y_label_formatter(&move |y| tick(*y, yspan))
        .draw()?;
    c.draw_series(
        pts.iter()
            .map(|p| Circle::new((p.1, p.2), 4, color(0).filled())),
    )?;
    c.draw_series(
        pts.iter()
            .map(|p| Text::new(p.0.clone(), (p.1, p.2), ("sans-serif", 11).into_font())),
    )?;
    root.present()?;
    Ok(())
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]
mod tests {
    use super::*;

    #[test]
    fn a_policy_has_one_colour_in_every_figure_and_a_peer_its_counterparts_dashed() {
        let default = kvroute_core::PolicySettings::default().policy.as_str();
        assert_eq!(style(default, 4).color, BLACK);
        assert!(style(default, 4).width > style("jsq", 4).width);
        assert_eq!(style("jsq", 0).color, style("jsq", 7).color);
        let peer = style("smg-1.13.0/cache_aware", 2);
        assert!(peer.peer && !style("sglang_cache_aware", 2).peer);
        assert_eq!(peer.color, style("sglang_cache_aware", 9).color);
        let dynamo = style("dynamo-1.6.1/kv", 3);
        assert!(dynamo.peer);
        assert_eq!(dynamo.color, style("dynamo_cost", 1).color);
        assert_eq!(
            style("dynamo-1.6.1/round-robin", 3).color,
            style("round_robin", 0).color
        );
        assert_eq!(
            style("smg-1.13.0/power_of_two", 0).color,
            style("p2c", 3).color
        );
        // Kvroute's twelve other policies and rules are twelve colours.
        let names = [
            "round_robin",
            "jsq",
            "p2c",
            "session_hash",
            "prefix_key",
            "load_cache_aware",
            "sglang_cache_aware",
            "llmd_scorer",
            "dynamo_cost",
            "chwbl",
            "dualmap",
            "lmetric",
        ];
        let mut colours: Vec<(u8, u8, u8)> = names
            .iter()
            .map(|n| {
                let c = style(n, 0).color;
                (c.0, c.1, c.2)
            })
            .collect();
        colours.sort_unstable();
        colours.dedup();
        assert_eq!(colours.len(), names.len());
        // Series that are not policies take the palette in order.
        assert_eq!(style("engine1", 1).color, color(1));
    }

    #[test]
    fn ticks_carry_only_the_decimals_their_axis_needs() {
        assert_eq!(tick(900.0, 1000.0), "900");
        assert_eq!(tick(2.5, 5.0), "2.5");
        assert_eq!(tick(0.35, 0.5), "0.35");
    }

    /// The PNG of a figure carries its text: the same chart with its text elements removed renders
    /// to different pixels (before the sans-serif mapping, every label vanished from the PNGs).
    #[test]
    fn png_figures_draw_their_labels() {
        let dir = std::env::temp_dir().join(format!("kvroute-fig-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("chart.svg");
        let series: Vec<Series> = vec![("policy".into(), vec![(1.0, 2.0), (2.0, 3.0)])];
        lines(&path, "A title", "x label", "y label", &series, true).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.contains("A title"));
        let mut bare = String::new();
        let mut rest = svg.as_str();
        while let Some(at) = rest.find("<text") {
            bare.push_str(&rest[..at]);
            let end = rest[at..].find("</text>").unwrap() + at + "</text>".len();
            rest = &rest[end..];
        }
        bare.push_str(rest);
        let opts = png_options();
        let with = svg_to_png(svg.as_bytes(), &opts).unwrap();
        let without = svg_to_png(bare.as_bytes(), &opts).unwrap();
        let px = |png: &[u8]| {
            resvg::tiny_skia::Pixmap::decode_png(png)
                .unwrap()
                .data()
                .to_vec()
        };
        assert_ne!(px(&with), px(&without), "the PNG has no text: no font");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
