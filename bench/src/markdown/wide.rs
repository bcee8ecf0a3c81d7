//! Tables with four columns: cim, cim with native handlers, Mosquitto and NATS, and cim's
//! ratio to each peer (the latency floor, unpaced fan-out and fresh-server tables).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use super::{native, ratio};

/// Columns, with their display names.
const KINDS: [(&str, &str); 4] =
    [("cim", "cim"), (native::KIND, "cim (native handlers)"), ("mqtt", "Mosquitto"), ("nats", "NATS")];

pub(super) fn header(out: &mut String) {
    let names = KINDS.map(|(_, name)| name);
    let _ = writeln!(out, "| | {} | cim ÷ Mosquitto | cim ÷ NATS |", names.join(" | "));
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|");
}

pub(super) fn per_kind<T>(map: &BTreeMap<String, T>, f: impl Fn(&T) -> Option<f64>) -> [Option<f64>; 4] {
    KINDS.map(|(k, _)| map.get(k).and_then(&f))
}

/// One row: the value per column, then cim's ratio to each peer (if `ratios`).
pub(super) fn row(
    out: &mut String,
    label: &str,
    v: [Option<f64>; 4],
    fmt: impl Fn(f64) -> String,
    ratios: bool,
) {
    let cell = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), &fmt);
    let r = |peer: Option<f64>| if ratios { ratio(v[0], peer) } else { String::new() };
    let _ = writeln!(
        out,
        "| {label} | {} | {} | {} | {} | {} | {} |",
        cell(v[0]),
        cell(v[1]),
        cell(v[2]),
        cell(v[3]),
        r(v[2]),
        r(v[3])
    );
}

/// Server CPU time per message (or delivery) in µs, from cores used at a rate per second.
pub(super) fn cpu_us_per(cores: Option<f64>, per_s: f64) -> Option<f64> {
    cores.filter(|_| per_s > 0.0).map(|c| c * 1e6 / per_s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_column_is_a_dash() {
        let mut out = String::new();
        row(&mut out, "x", [Some(2.0), None, Some(1.0), Some(4.0)], |v| format!("{v:.0}"), true);
        assert_eq!(out, "| x | 2 | - | 1 | 4 | 2.00× | 0.50× |\n");
        let mut out = String::new();
        row(&mut out, "y", [Some(2.0), Some(3.0), None, None], |v| format!("{v:.0}"), false);
        assert_eq!(out, "| y | 2 | 3 | - | - |  |  |\n");
    }

    #[test]
    fn cpu_per_message() {
        assert_eq!(cpu_us_per(Some(0.5), 1000.0), Some(500.0));
        assert_eq!(cpu_us_per(Some(0.5), 0.0), None);
        assert_eq!(cpu_us_per(None, 1000.0), None);
    }
}
