//! Any bytes as a reset event from the ring buffer: parsed, decoded and rendered.
#![no_main]

use std::time::{Duration, UNIX_EPOCH};

use conntrack_trace::{
    output::{Output, json::Json, text::Text},
    reset,
    verdict::Clock,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(event) = reset::parse(data) else {
        return;
    };
    let clock = Clock::from_boot_wall(UNIX_EPOCH + Duration::from_secs(1_700_000_000));
    let rst = reset::decode(&event, &clock);
    Json::new(std::io::sink()).reset(&rst).unwrap();
    Text::new(std::io::sink(), true).reset(&rst).unwrap();
});
