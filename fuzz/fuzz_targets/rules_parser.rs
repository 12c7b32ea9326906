//! Any text given to the rules parser: a rule set or an error naming the file, never a panic; the
//! same text always gives the same rules.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluicegate_core::rules::parse_text;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match parse_text("fuzz.yaml", text) {
        Ok(set) => {
            let lines: Vec<String> = set.rules().iter().map(|r| r.to_string()).collect();
            for line in &lines {
                assert!(line.starts_with("fuzz.yaml:"), "{line}");
            }
            let again = parse_text("fuzz.yaml", text).expect("the same text parses again");
            let again: Vec<String> = again.rules().iter().map(|r| r.to_string()).collect();
            assert_eq!(lines, again);
        }
        Err(e) => assert!(e.to_string().starts_with("fuzz.yaml"), "{e}"),
    }
});
