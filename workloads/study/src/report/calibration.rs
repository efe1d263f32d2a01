//! The calibration of the engine profile the live engines run.

use std::fmt::Write as _;

use super::charts::*;
use super::*;

/// The calibration's figures.
pub(super) fn figures(figs: &Figures, c: &Calibration) -> anyhow::Result<()> {
    let fig = |name: &str| figs.path(name);
    let ttft = vec![
        (
            "miss".to_string(),
            c.prefill
                .iter()
                .map(|p| (p.tokens as f64, p.miss_s * 1e3))
                .collect(),
        ),
        (
            "hit (repeat)".to_string(),
            c.prefill
                .iter()
                .map(|p| (p.tokens as f64, p.hit_s * 1e3))
                .collect(),
        ),
    ];
    e(lines(
        &fig("calibration_ttft"),
        "Calibration: TTFT of a miss and of a hit by prompt length",
        "prompt tokens",
        "TTFT (ms)",
        &ttft,
        true,
    ))?;
    let dec = vec![(
        "decode".to_string(),
        c.decode
            .iter()
            .map(|d| (d.batch as f64, d.step_s * 1e3))
            .collect(),
    )];
    e(lines(
        &fig("calibration_decode"),
        "Calibration: decode time per token by batch size",
        "concurrent sequences",
        "ms per token",
        &dec,
        true,
    ))?;
    Ok(())
}

/// The calibration on the page.
pub(super) fn section(h: &mut String, figs: &Figures, c: &Calibration) {
    let svg = |name: &str| figs.svg(name);
    let _ = write!(h, "<h2>Calibration of the engine profile</h2><p>Measured with <code>kvroute-calibrate</code>'s method on an engine of the same profile at real time (medians of three; hit = the same prompt again).</p><div class=fig>{}</div><div class=fig>{}</div><table><tr><th>prompt tokens</th><th>miss TTFT ms</th><th>hit TTFT ms</th><th>cached tokens</th></tr>", svg("calibration_ttft"), svg("calibration_decode"));
    for p in &c.prefill {
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{:.1}</td><td>{:.1}</td><td>{}</td></tr>",
            p.tokens,
            p.miss_s * 1e3,
            p.hit_s * 1e3,
            p.hit_cached
        );
    }
    let _ = write!(
        h,
        "</table><table><tr><th>batch</th><th>decode ms per token</th></tr>"
    );
    for d in &c.decode {
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{:.2}</td></tr>",
            d.batch,
            d.step_s * 1e3
        );
    }
    let _ = write!(h, "</table>");
}
