//! Any bytes as a packet event from the ring buffer: parsed, decoded (headers, reason,
//! window explanation, conntrack tuples) and rendered as JSON and text.
#![no_main]

use std::time::{Duration, UNIX_EPOCH};

use conntrack_trace::{
    output::{Output, json::Json, text::Text},
    verdict::{self, Clock},
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(event) = verdict::parse(data) else {
        return;
    };
    let clock = Clock::from_boot_wall(UNIX_EPOCH + Duration::from_secs(1_700_000_000));
    let record = verdict::decode(&event, &clock);
    Json::new(std::io::sink()).event(&record).unwrap();
    Text::new(std::io::sink(), true).event(&record).unwrap();
    if let Some(w) = &record.window {
        let _ = w.to_string();
    }
});
