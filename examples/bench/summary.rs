//! A figure over several runs: median, min and max.

use serde_json::{Value, json};

/// Median, min and max.
pub fn summary(values: &[f64]) -> Value {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    json!({"median": sorted[sorted.len() / 2], "min": sorted[0], "max": sorted[sorted.len() - 1], "runs": values})
}

pub fn median(value: &Value) -> f64 {
    value["median"].as_f64().unwrap_or(0.0)
}
