//! Runtime values: Envoy's `GET /runtime` answer, and `key=value` pairs as `runtime_modify` sets.
use kvroute_core::PolicySettings;

fn main() {
    afl::fuzz!(|data: &[u8]| {
        let d = PolicySettings::default();
        let _ = d.with_runtime_json(data);
        if let Ok(text) = std::str::from_utf8(data) {
            let pairs = text.lines().filter_map(|l| l.split_once('='));
            let (s, _) = d.with_runtime(pairs);
            for k in kvroute_core::config::RUNTIME_KEYS {
                let key = format!("kvroute.{k}");
                let v = s.runtime_value(&key).unwrap_or_default();
                let (back, errors) = d.with_runtime([(key.as_str(), v.as_str())]);
                assert!(errors.is_empty(), "{key}={v}: {errors:?}");
                assert_eq!(back.runtime_value(&key), Some(v));
            }
        }
    });
}
