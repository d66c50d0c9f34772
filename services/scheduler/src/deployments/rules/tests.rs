use std::collections::HashMap;

use kiln_proto::registry::v1::{ModelFile, PreparedBundle};
use kiln_proto::scheduler::v1::node;

use super::*;
use crate::state::fixtures;

/// The field an INVALID_ARGUMENT names.
fn field_of(err: crate::Error) -> String {
    match err {
        crate::Error::InvalidArgument { field, .. } => field,
        other => panic!("expected INVALID_ARGUMENT, got {other:?}"),
    }
}

#[test]
fn a_policy_left_out_gets_the_defaults() {
    let policy = complete_policy(None).expect("valid");
    assert_eq!(policy.scale_up_window, Some(seconds(30)));
    assert_eq!(policy.scale_down_window, Some(seconds(600)));
    assert_eq!(policy.scale_to_zero_window, Some(seconds(3600)));
    assert_eq!(
        policy.load_targets,
        HashMap::from([("concurrent_requests".to_owned(), 8.0)])
    );
    // What is given stays.
    let given = AutoscalingPolicy {
        scale_up_window: Some(seconds(0)),
        load_targets: HashMap::from([("kv_cache_utilization".to_owned(), 0.7)]),
        ..Default::default()
    };
    let policy = complete_policy(Some(given)).expect("valid");
    assert_eq!(policy.scale_up_window, Some(seconds(0)));
    assert_eq!(policy.scale_down_window, Some(seconds(600)));
    assert_eq!(policy.load_targets.len(), 1);
}

#[test]
fn a_bad_policy_names_its_field() {
    let negative = AutoscalingPolicy {
        scale_down_window: Some(prost_types::Duration {
            seconds: -1,
            nanos: 0,
        }),
        ..Default::default()
    };
    assert_eq!(
        field_of(complete_policy(Some(negative)).unwrap_err()),
        "deployment.autoscaling_policy.scale_down_window"
    );
    let target = |key: &str, value: f32| AutoscalingPolicy {
        load_targets: HashMap::from([(key.to_owned(), value)]),
        ..Default::default()
    };
    assert_eq!(
        field_of(complete_policy(Some(target("gpu_temperature", 1.0))).unwrap_err()),
        "deployment.autoscaling_policy.load_targets[gpu_temperature]"
    );
    for bad in [0.0, -2.0, f32::NAN, f32::INFINITY] {
        assert_eq!(
            field_of(complete_policy(Some(target("requests_per_second", bad))).unwrap_err()),
            "deployment.autoscaling_policy.load_targets[requests_per_second]"
        );
    }
}

#[test]
fn replica_bounds_fill_max_and_stay_in_range() {
    let bounds = |min, max| {
        let mut d = Deployment {
            min_replica_count: min,
            max_replica_count: max,
            ..Default::default()
        };
        check_replica_bounds(&mut d).map(|_| (d.min_replica_count, d.max_replica_count))
    };
    assert_eq!(bounds(0, 0).expect("valid"), (0, 1));
    assert_eq!(bounds(3, 0).expect("valid"), (3, 3));
    assert_eq!(bounds(2, 1000).expect("valid"), (2, 1000));
    assert_eq!(
        field_of(bounds(-1, 0).unwrap_err()),
        "deployment.min_replica_count"
    );
    assert_eq!(
        field_of(bounds(3, 2).unwrap_err()),
        "deployment.max_replica_count"
    );
    assert_eq!(
        field_of(bounds(1, 1001).unwrap_err()),
        "deployment.max_replica_count"
    );
}

#[test]
fn backends_and_context_lengths_are_checked() {
    for ok in ["", "tract", "onnxruntime"] {
        assert!(check_backend(ok).is_ok(), "{ok}");
    }
    assert_eq!(
        field_of(check_backend("vllm").unwrap_err()),
        "deployment.backend"
    );
    assert!(check_max_context_length(0).is_ok());
    assert_eq!(
        field_of(check_max_context_length(-1).unwrap_err()),
        "deployment.max_context_length"
    );
}

#[test]
fn a_replica_must_hold_the_largest_of_the_files_and_the_bundles() {
    let file = |size_bytes| ModelFile {
        size_bytes,
        ..Default::default()
    };
    let bundle = |sizes: &[i64]| PreparedBundle {
        files: sizes.iter().map(|s| file(*s)).collect(),
        ..Default::default()
    };
    let model = Model {
        files: vec![file(10), file(5)],
        prepared_bundles: vec![bundle(&[7, 2]), bundle(&[20, 1])],
        ..Default::default()
    };
    assert_eq!(model_bytes(&model), 21);
    let small_bundles = Model {
        prepared_bundles: vec![bundle(&[1])],
        ..model.clone()
    };
    assert_eq!(model_bytes(&small_bundles), 15);
    assert_eq!(model_bytes(&Model::default()), 0);
}

#[test]
fn the_default_accelerator_is_the_gpu_most_ready_nodes_have() {
    let with = |id: &str, kind: AcceleratorType, state: node::State| {
        let mut n = fixtures::node(id, state, 1);
        n.node.accelerators[0].r#type = kind as i32;
        n
    };
    let pick = |nodes| default_accelerator(&fixtures::state(vec![], nodes, vec![]));
    use AcceleratorType::*;
    use node::State::{Lost, Ready};
    assert_eq!(pick(vec![]), Cpu as i32);
    assert_eq!(pick(vec![with("c", Cpu, Ready)]), Cpu as i32);
    assert_eq!(
        pick(vec![
            with("a", NvidiaA10080gb, Ready),
            with("b", NvidiaH10080gb, Ready),
            with("c", NvidiaH10080gb, Ready),
            with("d", NvidiaA10080gb, Lost),
            with("e", NvidiaA10080gb, Lost),
        ]),
        NvidiaH10080gb as i32,
        "lost nodes do not count"
    );
    // A tie goes to the lower type; a group of no devices is no offer.
    let mut empty = with("e", NvidiaH10080gb, Ready);
    empty.node.accelerators[0].count = 0;
    assert_eq!(
        pick(vec![
            with("a", NvidiaH200141gb, Ready),
            with("b", NvidiaA10080gb, Ready),
            empty,
        ]),
        NvidiaA10080gb as i32
    );
}
