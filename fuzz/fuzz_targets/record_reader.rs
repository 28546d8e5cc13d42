//! Any bytes as a recording, through `replay`'s path: the streaming reader, then every record
//! it yields through the decoders, the correlator and both renderers.
#![no_main]

use conntrack_trace::{
    events::Events,
    hints::{Hints, Node},
    output::{Output, json::Json, text::Text},
    record::Reader,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(mut reader) = Reader::new(data) else {
        return;
    };
    let mut events = Events::new(*reader.clock(), Hints::new(Node::default()), true, None);
    let mut json = Json::new(std::io::sink());
    let mut text = Text::new(std::io::sink(), false);
    let mut rec = Vec::new();
    while let Ok(true) = reader.next_into(&mut rec) {
        // Every record comes from the input (a packet record from before the seqadj field is
        // padded to today's size, so a record may be longer than its bytes): the reader never
        // reads past what it was given.
        assert!(
            reader.offset() <= data.len() as u64,
            "the reader read past its input"
        );
        events.handle(&rec, &mut json).unwrap();
        events.handle(&rec, &mut text).unwrap();
    }
    json.summary(&events.summary).unwrap();
    text.summary(&events.summary).unwrap();
});
