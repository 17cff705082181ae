//! `#[stream_function]`: accepted signatures compile, wrong ones fail with a precise message.

#[test]
fn stream_function_signatures() {
    let cases = trybuild::TestCases::new();
    cases.pass("tests/ui/pass/*.rs");
    cases.compile_fail("tests/ui/fail/*.rs");
}
