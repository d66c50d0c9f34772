//! Forwarding a request to the node that holds its replica: the caller's own metadata (its
//! credentials), marked as forwarded, under this node's trace context.

use std::collections::HashMap;

use tonic::Status;
use tonic::metadata::{MetadataKey, MetadataMap, MetadataValue};

/// The header a forwarded request carries, so the node it reaches serves it or fails, and
/// never forwards it again.
const FORWARDED_HEADER: &str = "kiln-forwarded";

/// The W3C trace context headers.
const TRACEPARENT: &str = "traceparent";
const TRACESTATE: &str = "tracestate";

/// The request to send to a peer node: the caller's metadata (its own credentials), marked
/// as forwarded, with the current span's trace context in place of the caller's, so the
/// serving node's span is a child of this node's.
pub(crate) fn forward<T>(request: tonic::Request<T>) -> tonic::Request<T> {
    let (mut metadata, _, message) = request.into_parts();
    metadata.insert(FORWARDED_HEADER, MetadataValue::from_static("1"));
    replace_trace_context(&mut metadata);
    tonic::Request::from_parts(metadata, Default::default(), message)
}

/// Puts the current span's trace context in place of the one `metadata` came with. Without a
/// current context (no tracer installed) the incoming one stays: the serving node then still
/// joins the caller's trace.
fn replace_trace_context(metadata: &mut MetadataMap) {
    let mut current = HashMap::new();
    kiln_core::telemetry::inject_current(&mut current);
    if !current.contains_key(TRACEPARENT) {
        return;
    }
    // The caller's tracestate belongs with its traceparent: neither may outlive the swap.
    metadata.remove(TRACEPARENT);
    metadata.remove(TRACESTATE);
    for (key, value) in current {
        if let (Ok(key), Ok(value)) = (
            MetadataKey::from_bytes(key.as_bytes()),
            MetadataValue::try_from(value),
        ) {
            metadata.insert(key, value);
        }
    }
}

/// Whether a request came from another node.
pub(crate) fn is_forwarded<T>(request: &tonic::Request<T>) -> bool {
    request.metadata().contains_key(FORWARDED_HEADER)
}

/// A peer's failure as the caller sees it: a broken connection (tonic reports the h2 error as
/// UNKNOWN) is UNAVAILABLE, the node that held the replica having gone away. So is an INTERNAL
/// that this node's client made of a transport error (it has a source; a status the peer sent
/// has none): tonic reports a stream a stopping peer's GOAWAY left unanswered as INTERNAL
/// "h2 protocol error", where gRPC's HTTP/2 mapping says UNAVAILABLE (seen in the fault suite).
pub(crate) fn peer_status(status: Status) -> Status {
    let from_transport = std::error::Error::source(&status).is_some();
    match status.code() {
        tonic::Code::Unknown | tonic::Code::Cancelled => went_away(&status),
        tonic::Code::Internal if from_transport => went_away(&status),
        _ => status,
    }
}

fn went_away(status: &Status) -> Status {
    Status::unavailable(format!(
        "the node serving this request went away: {}",
        status.message()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `(trace id, parent span id)` of a traceparent header.
    fn ids(traceparent: &str) -> (String, String) {
        let parts: Vec<&str> = traceparent.split('-').collect();
        assert_eq!(parts.len(), 4, "a traceparent: {traceparent}");
        (parts[1].to_owned(), parts[2].to_owned())
    }

    #[test]
    fn a_forwarded_request_carries_this_nodes_span_as_the_parent() {
        let _telemetry =
            kiln_core::telemetry::init_for_tests("kiln-inference-test").expect("telemetry");
        let incoming = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let client_state = "client=1";
        // This node's server span, parented on the client's context as the server layer does.
        let span = tracing::info_span!("grpc.request");
        let carrier = HashMap::from([
            (TRACEPARENT.to_owned(), incoming.to_owned()),
            (TRACESTATE.to_owned(), client_state.to_owned()),
        ]);
        kiln_core::telemetry::set_parent_from(&span, &carrier);
        let _entered = span.enter();
        let mut current = HashMap::new();
        kiln_core::telemetry::inject_current(&mut current);

        let mut request = tonic::Request::new(());
        let metadata = request.metadata_mut();
        metadata.insert(TRACEPARENT, incoming.parse().unwrap());
        metadata.insert(TRACESTATE, client_state.parse().unwrap());
        metadata.insert("authorization", "Bearer caller-key".parse().unwrap());
        let forwarded = forward(request);

        let header = |key: &str| {
            let values: Vec<&str> = forwarded
                .metadata()
                .get_all(key)
                .iter()
                .map(|v| v.to_str().unwrap())
                .collect();
            assert_eq!(values.len(), 1, "one {key}: {values:?}");
            values[0].to_owned()
        };
        let traceparent = header(TRACEPARENT);
        let (trace, parent) = ids(&traceparent);
        let (incoming_trace, incoming_parent) = ids(incoming);
        assert_eq!(trace, incoming_trace, "the client's trace goes on");
        assert_ne!(parent, incoming_parent, "this node's span is the parent");
        assert_eq!(traceparent, current[TRACEPARENT], "the current span");
        assert_eq!(header(TRACESTATE), current[TRACESTATE]);
        assert_eq!(header("authorization"), "Bearer caller-key");
        assert!(is_forwarded(&forwarded));
    }

    #[test]
    fn without_a_tracer_the_callers_trace_context_stays() {
        let incoming = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let mut metadata = MetadataMap::new();
        metadata.insert(TRACEPARENT, incoming.parse().unwrap());
        let no_tracer = tracing::subscriber::NoSubscriber::default();
        tracing::subscriber::with_default(no_tracer, || {
            let _entered = tracing::info_span!("grpc.request").entered();
            replace_trace_context(&mut metadata);
        });
        assert_eq!(metadata.get(TRACEPARENT).unwrap(), incoming);
    }

    /// An error whose source is `status`, as hyper's error carries the one tonic finds.
    #[derive(Debug)]
    struct Transport(Status);

    impl std::fmt::Display for Transport {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("http2 error")
        }
    }

    impl std::error::Error for Transport {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn a_transport_failure_is_unavailable_and_a_peers_own_status_stays() {
        // What tonic makes of a stream a stopping peer's GOAWAY left unanswered.
        let goaway = Status::internal("h2 protocol error: http2 error");
        let status = Status::from_error(Box::new(Transport(goaway)));
        assert_eq!(status.code(), tonic::Code::Internal);
        assert_eq!(peer_status(status).code(), tonic::Code::Unavailable);
        // The peer's own answers keep their codes.
        let internal = Status::internal("the peer failed");
        assert_eq!(peer_status(internal).code(), tonic::Code::Internal);
        let missing = Status::not_found("no such model");
        assert_eq!(peer_status(missing).code(), tonic::Code::NotFound);
        assert_eq!(
            peer_status(Status::unknown("reset")).code(),
            tonic::Code::Unavailable
        );
    }
}
