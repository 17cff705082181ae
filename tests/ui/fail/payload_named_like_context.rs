use bindery::stream_function;

#[derive(serde::Deserialize)]
struct Headers {
    count: u32,
}

// Taken for bindery's `Headers` by its name, this would be a supplier polled every second.
#[stream_function(output = "counted")]
async fn count(headers: Headers) -> u32 {
    headers.count
}

fn main() {}
