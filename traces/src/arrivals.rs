//! Arrival processes: when each session starts, in ms from the start of the run.

use crate::rng::Rng;

/// `n` Poisson arrivals at `rate_per_s`.
pub fn poisson(n: usize, rate_per_s: f64, seed: u64) -> Vec<f64> {
    let mut r = Rng::new(seed);
    let mean_ms = 1000.0 / rate_per_s.max(1e-9);
    let mut t = 0.0;
    (0..n)
        .map(|_| {
            t += r.exponential(mean_ms);
            t
        })
        .collect()
}

/// Timestamps (ms) shifted to start at 0 and divided by `speedup` (2 = twice as fast).
pub fn scaled(timestamps_ms: &[f64], speedup: f64) -> Vec<f64> {
    let first = timestamps_ms.iter().cloned().fold(f64::INFINITY, f64::min);
    let s = if speedup > 0.0 { speedup } else { 1.0 };
    timestamps_ms.iter().map(|t| (t - first) / s).collect()
}

/// Why a CSV could not be read.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct CsvError {
    /// 1-based line.
    pub line: usize,
    /// What is wrong.
    pub message: String,
}

/// Arrival times (ms from the first) of an Azure LLM inference trace CSV
/// (`TIMESTAMP,ContextTokens,GeneratedTokens`, timestamps `YYYY-MM-DD HH:MM:SS.fffffff`), with the
/// token counts of each request.
pub fn azure_csv(text: &str) -> Result<Vec<(f64, u32, u32)>, CsvError> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate().skip(1) {
        if line.trim().is_empty() {
            continue;
        }
        let err = |m: &str| CsvError {
            line: i + 1,
            message: m.to_string(),
        };
        let mut f = line.split(',');
        let ts = f.next().ok_or_else(|| err("no timestamp"))?;
        let ctx = f
            .next()
            .and_then(|v| v.trim().parse().ok())
            .ok_or_else(|| err("bad ContextTokens"))?;
        let gen = f
            .next()
            .and_then(|v| v.trim().parse().ok())
            .ok_or_else(|| err("bad GeneratedTokens"))?;
        out.push((
            seconds_of_day(ts).ok_or_else(|| err("bad TIMESTAMP"))? * 1000.0,
            ctx,
            gen,
        ));
    }
    let first = out.first().map_or(0.0, |r| r.0);
    // Traces span days: keep the order of the file, unwrap midnight.
    let mut day = 0.0;
    let mut prev = first;
    for r in &mut out {
        if r.0 + day < prev - 43_200_000.0 {
            day += 86_400_000.0;
        }
        r.0 += day;
        prev = r.0;
        r.0 -= first;
    }
    Ok(out)
}

fn seconds_of_day(ts: &str) -> Option<f64> {
    let time = ts.trim().split(' ').nth(1)?;
    let mut p = time.split(':');
    let h: f64 = p.next()?.parse().ok()?;
    let m: f64 = p.next()?.parse().ok()?;
    let s: f64 = p.next()?.parse().ok()?;
    Some(h * 3600.0 + m * 60.0 + s)
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
    fn poisson_has_its_rate_and_is_reproducible() {
        let a = poisson(20_000, 5.0, 7);
        assert_eq!(a, poisson(20_000, 5.0, 7));
        let rate = 20_000.0 / (a[a.len() - 1] / 1000.0);
        assert!((rate - 5.0).abs() < 0.15, "{rate}");
        assert!(a.windows(2).all(|w| w[0] <= w[1]));
    }

    #[test]
    fn azure_csv_parses_and_scales() {
        let csv = "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.5000000,374,44\n2023-11-16 18:15:50.5000000,396,109\n";
        let r = azure_csv(csv).unwrap();
        assert_eq!(r, vec![(0.0, 374, 44), (4000.0, 396, 109)]);
        let ts: Vec<f64> = r.iter().map(|x| x.0).collect();
        assert_eq!(scaled(&ts, 2.0), vec![0.0, 2000.0]);
        assert!(azure_csv("h\nbad,1\n").is_err());
    }
}
