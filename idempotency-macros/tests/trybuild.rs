//! Compile-time checks of the handler attributes.

#[test]
fn attributes_compile_where_they_should_and_fail_clearly_where_not() {
    let cases = trybuild::TestCases::new();
    cases.pass("tests/ui/pass/*.rs");
    cases.compile_fail("tests/ui/fail/*.rs");
}
