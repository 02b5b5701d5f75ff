//! The overlapped step on the GPU (`engine.overlap`): each step's greedy
//! ids go from its argmax into the next step's embedding on the device
//! and reach the host behind the next forward; the rows are the in-order
//! step's, token for token, with preemption. Likewise decode steps
//! replayed from CUDA graphs (`engine.cuda_graphs`) against eager ones.

use crate::batching::{assert_same_rows, field, overlap_off_and_on, setting_off_and_on};

#[test]
fn overlapped_steps_on_the_gpu_give_the_in_order_tokens() {
    for m in crate::common::models() {
        let tmp = tempfile::tempdir().unwrap();
        let [(off, _), (on, log)] =
            overlap_off_and_on(tmp.path(), m, "f16", &["engine.device=cuda"]);
        assert_same_rows(&off, &on);
        assert!(
            field(&log, "preemptions") > 0,
            "{m}: the small cache must force preemption:\n{log}"
        );
    }
}

#[test]
fn decode_steps_replayed_from_cuda_graphs_give_the_eager_tokens() {
    for m in crate::common::models() {
        let tmp = tempfile::tempdir().unwrap();
        let device = ["engine.device=cuda"];
        let [(off, _), (on, log)] =
            setting_off_and_on(tmp.path(), m, "f16", &device, "engine.cuda_graphs");
        assert_same_rows(&off, &on);
        assert!(
            field(&log, "replays") > 0 && field(&log, "captures") > 0,
            "{m}: some decode steps must replay a graph:\n{log}"
        );
    }
}
