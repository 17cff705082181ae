use bindery::prelude::*;

#[stream_function(output = "audit-log")]
fn audit(line: String) {
    println!("{line}");
}

fn main() {}
