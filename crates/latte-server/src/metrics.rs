//! Prometheus metrics, written by hand in the text exposition format: requests by route, method and
//! status; latency histograms by route; requests in flight; the encoding pool (queue depth, batches,
//! texts); documents per index.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// Upper bounds of the latency buckets, in seconds.
pub const BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

#[derive(Default)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

/// The server's counters.
#[derive(Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(String, String, u16), u64>>,
    latency: Mutex<BTreeMap<(String, String), Histogram>>,
    /// Requests being answered now.
    pub in_flight: AtomicU64,
}

impl Metrics {
    /// Records one answered request.
    pub fn record(&self, route: &str, method: &str, status: u16, elapsed: Duration) {
        let secs = elapsed.as_secs_f64();
        {
            let mut r = self.requests.lock().unwrap_or_else(|p| p.into_inner());
            *r.entry((route.to_string(), method.to_string(), status))
                .or_insert(0) += 1;
        }
        let mut l = self.latency.lock().unwrap_or_else(|p| p.into_inner());
        let h = l
            .entry((route.to_string(), method.to_string()))
            .or_default();
        for (i, le) in BUCKETS.iter().enumerate() {
            if secs <= *le {
                h.counts[i] += 1;
            }
        }
        h.count += 1;
        h.sum += secs;
    }

    /// The request metrics in the exposition format.
    pub fn render_requests(&self, out: &mut String) {
        out.push_str("# HELP latte_http_requests_total HTTP requests answered, by route, method and status.\n");
        out.push_str("# TYPE latte_http_requests_total counter\n");
        let r = self.requests.lock().unwrap_or_else(|p| p.into_inner());
        for ((route, method, status), n) in r.iter() {
            let _ = writeln!(
                out,
                "latte_http_requests_total{{route=\"{}\",method=\"{}\",status=\"{status}\"}} {n}",
                escape(route),
                escape(method)
            );
        }
        drop(r);
        out.push_str("# HELP latte_http_request_duration_seconds Time to answer a request, by route and method.\n");
        out.push_str("# TYPE latte_http_request_duration_seconds histogram\n");
        let l = self.latency.lock().unwrap_or_else(|p| p.into_inner());
        for ((route, method), h) in l.iter() {
            let labels = format!("route=\"{}\",method=\"{}\"", escape(route), escape(method));
            for (i, le) in BUCKETS.iter().enumerate() {
                let _ = writeln!(
                    out,
                    "latte_http_request_duration_seconds_bucket{{{labels},le=\"{le}\"}} {}",
                    h.counts[i]
                );
            }
            let _ = writeln!(
                out,
                "latte_http_request_duration_seconds_bucket{{{labels},le=\"+Inf\"}} {}",
                h.count
            );
            let _ = writeln!(
                out,
                "latte_http_request_duration_seconds_sum{{{labels}}} {}",
                h.sum
            );
            let _ = writeln!(
                out,
                "latte_http_request_duration_seconds_count{{{labels}}} {}",
                h.count
            );
        }
        drop(l);
        out.push_str("# HELP latte_http_requests_in_flight Requests being answered now.\n");
        out.push_str("# TYPE latte_http_requests_in_flight gauge\n");
        let _ = writeln!(
            out,
            "latte_http_requests_in_flight {}",
            self.in_flight.load(Ordering::Relaxed)
        );
    }
}

/// A gauge or counter family with one label, written in the exposition format.
pub fn render_family(
    out: &mut String,
    name: &str,
    kind: &str,
    help: &str,
    label: &str,
    values: &[(String, f64)],
) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
    for (v, x) in values {
        let _ = writeln!(out, "{name}{{{label}=\"{}\"}} {x}", escape(v));
    }
}

/// Escapes a label value (backslash, double quote, newline).
pub fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let m = Metrics::default();
        m.record("/r", "GET", 200, Duration::from_millis(3));
        m.record("/r", "GET", 404, Duration::from_millis(200));
        let mut out = String::new();
        m.render_requests(&mut out);
        assert!(
            out.contains("latte_http_requests_total{route=\"/r\",method=\"GET\",status=\"200\"} 1")
        );
        assert!(
            out.contains("latte_http_requests_total{route=\"/r\",method=\"GET\",status=\"404\"} 1")
        );
        assert!(
            out.contains("_bucket{route=\"/r\",method=\"GET\",le=\"0.001\"} 0"),
            "{out}"
        );
        assert!(
            out.contains("_bucket{route=\"/r\",method=\"GET\",le=\"0.005\"} 1"),
            "{out}"
        );
        assert!(
            out.contains("_bucket{route=\"/r\",method=\"GET\",le=\"0.25\"} 2"),
            "{out}"
        );
        assert!(
            out.contains("_count{route=\"/r\",method=\"GET\"} 2"),
            "{out}"
        );
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
