//! The model against open_clip's outputs on the `coca-tiny` fixture, on the fused CPU ops
//! (`portable_ops` runs the same checks on the portable ones).

mod common;

#[test]
fn forward_matches_open_clip() {
    common::model_checks::assert_forward_matches();
}

#[test]
fn every_gradient_matches_open_clip() {
    common::model_checks::assert_gradients_match();
}
