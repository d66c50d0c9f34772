//! Bad input everywhere: each bad field is a clear INVALID_ARGUMENT that names it (in the
//! message and in the BadRequest details), nothing is stored, and the process stays up for the
//! next caller. NaN and infinite sampling parameters, NUL and control characters in text, a
//! hundred thousand stop sequences, names with unicode edge cases, negative offsets (named
//! before the file's state is looked at), a dataset line nested ten thousand deep, a message
//! over the transport's limit.

use std::time::Duration;

use kiln_proto::kiln_inference::v1 as infv1;
use kiln_proto::registry::v1 as regv1;
use kiln_tests::llm::{chat_request, first_chat, send_chat, smollm2_asset_dir};
use tonic::Code;
use tonic_types::StatusExt as _;

/// The status names `field`: INVALID_ARGUMENT, the message starts with it, the details say it.
fn names_field(result: Result<impl std::fmt::Debug, tonic::Status>, field: &str, case: &str) {
    let status = result.expect_err(case);
    assert_eq!(status.code(), Code::InvalidArgument, "{case}: {status:?}");
    assert!(
        status.message().starts_with(&format!("{field}:")),
        "{case}: {}",
        status.message()
    );
    let violations = status.get_details_bad_request().map(|b| b.field_violations);
    assert_eq!(
        violations
            .unwrap_or_default()
            .first()
            .map(|v| v.field.as_str()),
        Some(field),
        "{case}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_field_is_named_and_the_process_stays_up() {
    let assets = smollm2_asset_dir();
    let mesh = kiln_tests::library_mesh(assets.path(), None).await;
    let acme = mesh.tenant_channel("acme").await;
    first_chat(&acme, "Hi", 1, Duration::from_secs(300)).await;
    let mut tried = 0;

    // Sampling parameters that are not numbers, or out of range, or too many.
    let base = || chat_request("Hi", 4);
    let cases: Vec<(&str, infv1::CreateChatCompletionRequest)> = vec![
        (
            "temperature",
            infv1::CreateChatCompletionRequest {
                temperature: Some(f32::NAN),
                ..base()
            },
        ),
        (
            "temperature",
            infv1::CreateChatCompletionRequest {
                temperature: Some(f32::INFINITY),
                ..base()
            },
        ),
        (
            "top_p",
            infv1::CreateChatCompletionRequest {
                top_p: Some(f32::NAN),
                ..base()
            },
        ),
        (
            "min_p",
            infv1::CreateChatCompletionRequest {
                min_p: Some(f32::NEG_INFINITY),
                ..base()
            },
        ),
        (
            "frequency_penalty",
            infv1::CreateChatCompletionRequest {
                frequency_penalty: Some(f32::NAN),
                ..base()
            },
        ),
        (
            "repetition_penalty",
            infv1::CreateChatCompletionRequest {
                repetition_penalty: Some(f32::INFINITY),
                ..base()
            },
        ),
        (
            "max_tokens",
            infv1::CreateChatCompletionRequest {
                max_tokens: Some(-5),
                ..base()
            },
        ),
        (
            "n",
            infv1::CreateChatCompletionRequest {
                n: Some(100_000),
                ..base()
            },
        ),
        (
            "top_k",
            infv1::CreateChatCompletionRequest {
                top_k: Some(-1),
                ..base()
            },
        ),
        (
            "stop",
            infv1::CreateChatCompletionRequest {
                stop: vec!["x".into(); 100_000],
                ..base()
            },
        ),
    ];
    for (field, request) in cases {
        names_field(send_chat(&acme, request).await, field, field);
        tried += 1;
    }

    // Resource IDs with unicode edge cases, and lengths around the limit.
    let long = "a".repeat(64);
    for id in [
        "Ünïcödé",
        "modèl",
        "zero\u{200b}width",
        "emoji-🔥",
        "rtl-\u{202e}txt",
        "",
        "-lead",
        "trail-",
        "a/b",
        "UPPER",
        &long,
        "a\u{0301}",
    ] {
        let request = regv1::CreateModelRequest {
            parent: "accounts/acme".into(),
            model_id: id.to_owned(),
            model: Some(regv1::Model {
                kind: regv1::model::Kind::BaseModel as i32,
                ..Default::default()
            }),
        };
        let created = kiln_tests::registry::models(&acme)
            .create_model(request)
            .await;
        names_field(created, "model_id", &format!("model id {id:?}"));
        tried += 1;
    }
    // Unicode where free text belongs is kept exactly.
    let text = "Zürich 🔥 \u{202e}עברית\u{202c} a\u{0301} tab\tend";
    let model = kiln_tests::registry::create_model(
        &acme,
        "acme",
        "unicode",
        regv1::model::Kind::BaseModel,
        None,
    )
    .await;
    let with = |display_name: &str, description: &str| regv1::Model {
        name: model.name.clone(),
        display_name: display_name.into(),
        description: description.into(),
        ..Default::default()
    };
    let paths = ["display_name", "description"];
    let plain = "Zürich 🔥 \u{202e}עברית\u{202c} a\u{0301}";
    let updated = kiln_tests::registry::update_model(&acme, with(plain, text), &paths);
    let updated = updated.await.unwrap();
    assert_eq!(
        (updated.display_name.as_str(), updated.description.as_str()),
        (plain, text)
    );
    // NUL, which no database's text holds, and control characters in a name are refused
    // (on PostgreSQL a NUL was an INTERNAL error).
    for (display_name, description, field) in [
        ("nul\u{0000}", "", "model.display_name"),
        ("tab\tname", "", "model.display_name"),
        ("fine", "nul\u{0000}", "model.description"),
    ] {
        let answer =
            kiln_tests::registry::update_model(&acme, with(display_name, description), &paths);
        names_field(answer.await, field, field);
        tried += 1;
    }
    let kept = kiln_tests::registry::get_model(&acme, &model.name)
        .await
        .unwrap();
    assert_eq!(
        (kept.display_name.as_str(), kept.description.as_str()),
        (plain, text)
    );

    // A negative offset or length.
    let dataset = kiln_tests::registry::create_dataset(&acme, "acme", "lines").await;
    for (field, offset, length) in [("offset", -1, 0), ("length", 0, -1)] {
        let request = regv1::DownloadDatasetRequest {
            name: dataset.name.clone(),
            offset,
            length,
        };
        let answer = kiln_tests::registry::datasets(&acme)
            .download_dataset(request)
            .await;
        names_field(answer.map(|_| ()), field, field);
        tried += 1;
    }

    // A line nested ten thousand deep: the dataset fails naming the line; nothing else breaks.
    let deep = format!(
        "{{\"messages\": {}{}}}\n",
        "[".repeat(10_000),
        "]".repeat(10_000)
    );
    let body = format!(
        "{{\"messages\": [{{\"role\": \"user\", \"content\": \"hi\"}}, {{\"role\": \"assistant\", \"content\": \"yo\"}}]}}\n{deep}"
    );
    let uploaded = kiln_tests::registry::upload_dataset(&acme, &dataset.name, body.as_bytes());
    let refused = uploaded.await.expect_err("a line nested 10,000 deep");
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    assert!(
        refused.message().contains("line 2"),
        "{}",
        refused.message()
    );
    let kept = kiln_tests::registry::get_dataset(&acme, &dataset.name)
        .await
        .unwrap();
    assert_ne!(kept.state, regv1::dataset::State::Ready as i32, "{kept:?}");
    tried += 1;

    // A message over the transport's limit is refused by the transport, not by a crash.
    let huge = infv1::CreateChatCompletionRequest {
        messages: vec![infv1::ChatMessage {
            role: "user".into(),
            content: "x".repeat(40 << 20),
            name: String::new(),
        }],
        ..base()
    };
    let refused = send_chat(&acme, huge).await.expect_err("a 40 MiB message");
    assert!(
        matches!(
            refused.code(),
            Code::ResourceExhausted | Code::OutOfRange | Code::InvalidArgument
        ),
        "{refused:?}"
    );
    tried += 1;

    // The process is up and serves the next caller.
    let answer = send_chat(&acme, base()).await.unwrap();
    assert!(!answer.choices.is_empty());
    eprintln!(
        "bad inputs tried: {tried}, each refused naming its field; the process answers after"
    );
    mesh.shutdown().await;
}
