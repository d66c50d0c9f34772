//! The GGUF reader's tests, on headers built here and on the real SmolLM2 checkpoint.

use std::io;

use super::header::*;
use super::testdata::{TINY_CHAT_TEMPLATE, V, build, s, tiny_llama};
use super::*;

fn read(bytes: &[u8]) -> Result<GgufInfo, FormatError> {
    read_gguf("model.gguf", bytes)
}

fn problem(bytes: &[u8]) -> String {
    read(bytes).expect_err("should be rejected").problem
}

#[test]
fn reads_a_llama_header_with_any_integer_types() {
    let info = read(&tiny_llama()).unwrap();
    let per_layer = 8 + 64 + 32 + 32 + 64 + 8 + 128 + 128 + 128;
    // Every field but the tensors (checked below); the integers are stored in assorted types.
    let without_tensors = GgufInfo {
        tensors: Vec::new(),
        ..info.clone()
    };
    let expected = GgufInfo {
        version: 3,
        architecture: "llama".into(),
        name: Some("tiny".into()),
        context_length: Some(2048),
        block_count: Some(2),
        embedding_length: Some(8),
        feed_forward_length: Some(16),
        head_count: Some(2),
        head_count_kv: Some(1),
        rope_freq_base: Some(10000.0),
        rms_norm_epsilon: Some(f64::from(1e-5f32)),
        vocab_size: Some(5),
        tokenizer_model: Some("gpt2".into()),
        chat_template: Some(TINY_CHAT_TEMPLATE.into()),
        bos_token_id: Some(0),
        eos_token_id: Some(1),
        tensors: Vec::new(),
        parameter_count: 40 + 8 + 2 * per_layer,
    };
    assert_eq!(without_tensors, expected);
    assert_eq!(info.tensors.len(), 2 + 2 * 9);
    assert_eq!(info.tensors[0].name, "token_embd.weight");
    assert_eq!(info.tensors[0].dims, vec![8, 5]);
    assert_eq!(info.tensors[0].ggml_type, 3);
    assert_eq!(
        info.tensor("blk.1.ffn_down.weight").unwrap().dims,
        vec![16, 8]
    );
    assert!(info.tensor("blk.2.ffn_down.weight").is_none());
    info.check_preparable("model.gguf").unwrap();
}

#[test]
fn reads_version_2_and_rejects_others() {
    let kvs = [("general.architecture", s("llama"))];
    assert_eq!(read(&build(2, &kvs, &[])).unwrap().version, 2);
    assert_eq!(
        problem(&build(1, &kvs, &[])),
        "GGUF version 1 is not supported (Kiln reads versions 2 and 3)"
    );
    assert!(problem(&build(4, &kvs, &[])).contains("version 4"));
}

#[test]
fn missing_optional_metadata_is_none() {
    let info = read(&build(3, &[("general.architecture", s("llama"))], &[])).unwrap();
    assert_eq!(info.block_count, None);
    assert_eq!(info.vocab_size, None);
    assert_eq!(info.chat_template, None);
    assert_eq!(info.parameter_count, 0);
}

#[test]
fn rejects_bad_magic() {
    let mut bytes = tiny_llama();
    bytes[..4].copy_from_slice(b"PK\x03\x04");
    let p = problem(&bytes);
    assert!(p.starts_with("not a GGUF file"), "{p}");
    let err = read(b"{\"a\": 1}").unwrap_err();
    assert!(
        err.to_string().starts_with("model.gguf: not a GGUF file"),
        "{err}"
    );
}

#[test]
fn every_truncation_is_an_unexpected_end_of_file() {
    let bytes = tiny_llama();
    for cut in 0..bytes.len() {
        let p = problem(&bytes[..cut]);
        assert!(
            p.starts_with("unexpected end of file while reading "),
            "cut at {cut}: {p}"
        );
    }
    assert_eq!(
        problem(&bytes[..2]),
        "unexpected end of file while reading the magic number (at byte 0)"
    );
    assert_eq!(
        problem(&bytes[..6]),
        "unexpected end of file while reading the version (at byte 4)"
    );
    // A cut inside the tokens array names the key.
    let at = bytes
        .windows(b"</s>".len())
        .position(|w| w == b"</s>")
        .unwrap();
    assert!(
        problem(&bytes[..at + 2]).contains("metadata \"tokenizer.ggml.tokens\""),
        "{}",
        problem(&bytes[..at + 2])
    );
    // A cut inside the tensor infos names the tensor.
    let at = bytes
        .windows(b"blk.1.ffn_up.weight".len())
        .position(|w| w == b"blk.1.ffn_up.weight")
        .unwrap();
    let p = problem(&bytes[..at + 25]);
    assert!(p.contains("tensor \"blk.1.ffn_up.weight\""), "{p}");
}

#[test]
fn rejects_absurd_lengths_and_counts() {
    // tensor count
    let mut bytes = build(3, &[], &[]);
    bytes[8..16].copy_from_slice(&(1u64 << 40).to_le_bytes());
    let p = problem(&bytes);
    assert!(p.contains("the tensor count is 1099511627776"), "{p}");
    // metadata count
    let mut bytes = build(3, &[], &[]);
    bytes[16..24].copy_from_slice(&(MAX_COUNT + 1).to_le_bytes());
    assert!(problem(&bytes).contains("the metadata count"));
    // key length
    let mut bytes = build(3, &[("general.architecture", s("llama"))], &[]);
    bytes[24..32].copy_from_slice(&(MAX_STRING_LEN + 1).to_le_bytes());
    let p = problem(&bytes);
    assert!(p.contains("longer than the 64 MiB allowed"), "{p}");
    // array length
    let mut bytes = build(3, &[("a", V::Arr(T_UINT8, vec![]))], &[]);
    let len_at = bytes.len() - 8;
    bytes[len_at..].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(problem(&bytes).contains("the length of metadata \"a\""));
    // rank
    let bytes = build(
        3,
        &[("general.architecture", s("llama"))],
        &[("t", &[1, 1, 1, 1, 1, 1, 1, 1, 1], 0)],
    );
    assert_eq!(
        problem(&bytes),
        "tensor \"t\" has 9 dimensions; at most 8 are allowed"
    );
    // dims whose product overflows
    let bytes = build(
        3,
        &[("general.architecture", s("llama"))],
        &[("t", &[u64::MAX, 2], 0)],
    );
    assert!(problem(&bytes).contains("absurd dimensions"));
}

#[test]
fn rejects_unknown_types_and_deep_nesting() {
    let mut bytes = build(3, &[("k", V::U32(1))], &[]);
    let ty_at = bytes.len() - 8;
    bytes[ty_at..ty_at + 4].copy_from_slice(&13u32.to_le_bytes());
    assert_eq!(problem(&bytes), "metadata \"k\" has unknown value type 13");

    let mut deep = V::Arr(T_UINT8, vec![]);
    for _ in 0..10 {
        deep = V::Arr(T_ARRAY, vec![deep]);
    }
    let p = problem(&build(3, &[("deep", deep)], &[]));
    assert!(p.contains("nests arrays more than 4 deep"), "{p}");
    let nested = |depth: u32| {
        let mut value = V::Arr(T_UINT8, vec![V::U8(1)]);
        for _ in 1..depth {
            value = V::Arr(T_ARRAY, vec![value]);
        }
        build(
            3,
            &[("general.architecture", s("llama")), ("n", value)],
            &[],
        )
    };
    read(&nested(MAX_ARRAY_DEPTH)).unwrap();
    GgufFile::open("m.gguf", io::Cursor::new(nested(MAX_ARRAY_DEPTH))).unwrap();
    assert!(problem(&nested(MAX_ARRAY_DEPTH + 1)).contains("nests arrays more than 4 deep"));

    let mut bytes = build(3, &[("flag", V::Bool(true))], &[]);
    *bytes.last_mut().unwrap() = 7;
    assert!(problem(&bytes).contains("invalid value 7"));
}

#[test]
fn rejects_wrongly_typed_metadata() {
    let arch = ("general.architecture", s("llama"));
    let cases = [
        (
            vec![arch.clone(), ("llama.block_count", V::I32(-1))],
            "metadata \"llama.block_count\" is negative (-1)",
        ),
        (
            vec![arch.clone(), ("llama.block_count", s("30"))],
            "metadata \"llama.block_count\" is a string, expected an integer",
        ),
        (
            vec![("general.architecture", V::U32(1))],
            "metadata \"general.architecture\" is an integer, expected a string",
        ),
        (
            vec![arch, ("tokenizer.ggml.tokens", s("abc"))],
            "metadata \"tokenizer.ggml.tokens\" is a string, not an array",
        ),
        (
            vec![("general.name", s("x"))],
            "missing metadata key general.architecture",
        ),
    ];
    for (kvs, expected) in cases {
        assert_eq!(problem(&build(3, &kvs, &[])), expected);
    }
}

#[test]
fn check_preparable_accepts_the_llama_family_only() {
    let info = |arch: &str| GgufInfo {
        architecture: arch.into(),
        block_count: Some(2),
        embedding_length: Some(8),
        head_count: Some(2),
        head_count_kv: Some(1),
        ..GgufInfo::default()
    };
    info("llama").check_preparable("m.gguf").unwrap();
    info("mistral").check_preparable("m.gguf").unwrap();
    let err = info("gpt2").check_preparable("m.gguf").unwrap_err();
    assert_eq!(
        err.to_string(),
        "m.gguf: architecture \"gpt2\" cannot be prepared; Kiln prepares llama-family \
         checkpoints"
    );
    let cases = [
        (
            GgufInfo {
                head_count: None,
                ..info("llama")
            },
            "missing metadata key llama.attention.head_count",
        ),
        (
            GgufInfo {
                block_count: None,
                ..info("llama")
            },
            "missing metadata key llama.block_count",
        ),
        (
            GgufInfo {
                embedding_length: Some(9),
                ..info("llama")
            },
            "llama.embedding_length 9 is not a multiple of llama.attention.head_count 2",
        ),
    ];
    for (broken, expected) in cases {
        assert_eq!(
            broken.check_preparable("m.gguf").unwrap_err().problem,
            expected
        );
    }
}

#[test]
fn reads_the_real_smollm2_checkpoint() {
    let path = crate::test_asset("smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf");
    let f = std::fs::File::open(&path).unwrap();
    let info = read_gguf("SmolLM2-135M-Instruct.Q4_1.gguf", io::BufReader::new(f)).unwrap();
    println!(
        "{}: v{} {} {:?}, {} tensors, {} parameters, ctx {:?}, ffn {:?}, rope {:?}, \
         tokenizer {:?}, bos {:?}, eos {:?}",
        path.display(),
        info.version,
        info.architecture,
        info.name,
        info.tensors.len(),
        info.parameter_count,
        info.context_length,
        info.feed_forward_length,
        info.rope_freq_base,
        info.tokenizer_model,
        info.bos_token_id,
        info.eos_token_id
    );
    assert_eq!(info.architecture, "llama");
    assert_eq!(info.block_count, Some(30));
    assert_eq!(info.head_count, Some(9));
    assert_eq!(info.head_count_kv, Some(3));
    assert_eq!(info.embedding_length, Some(576));
    assert_eq!(info.vocab_size, Some(49152));
    assert_eq!(info.context_length, Some(8192));
    assert_eq!(info.tokenizer_model.as_deref(), Some("gpt2"));
    assert_eq!(info.tensors.len(), 2 + 30 * 9);
    let template = info.chat_template.as_deref().expect("a chat template");
    assert!(template.contains("<|im_start|>"), "not ChatML: {template}");
    info.check_preparable("SmolLM2-135M-Instruct.Q4_1.gguf")
        .unwrap();
    let q = info
        .tensor("blk.0.attn_q.weight")
        .expect("blk.0.attn_q.weight");
    assert_eq!(q.dims, vec![576, 576]);
    let k = info
        .tensor("blk.29.attn_k.weight")
        .expect("blk.29.attn_k.weight");
    assert_eq!(k.dims, vec![576, 192]);
    assert_eq!(
        info.tensor("token_embd.weight").unwrap().dims,
        vec![576, 49152]
    );
    assert!(
        (130_000_000..140_000_000).contains(&info.parameter_count),
        "{}",
        info.parameter_count
    );
}

#[test]
fn validation_and_preparation_read_the_same_header() {
    let bytes = tiny_llama();
    let file = GgufFile::open("model.gguf", io::Cursor::new(bytes.clone())).unwrap();
    assert_eq!(file.info, read(&bytes).unwrap());
    // Preparation keeps the arrays validation only counts.
    let tokens = file.get("tokenizer.ggml.tokens").and_then(Value::as_array);
    assert_eq!(tokens.map(<[Value]>::len), Some(5));
    assert_eq!(
        file.get("tokenizer.ggml.merges")
            .and_then(Value::as_array)
            .and_then(|m| m[0].as_str()),
        Some("a b")
    );
    assert_eq!(file.info.rms_norm_epsilon, Some(f64::from(1e-5f32)));
}

/// A checkpoint with two f32 tensors, its data section aligned to `alignment`.
fn two_f32_tensors(alignment: u32) -> Vec<u8> {
    let kvs = [
        ("general.architecture", s("llama")),
        ("general.alignment", V::U32(alignment)),
    ];
    // build() puts tensor i at offset 64·i.
    let mut bytes = build(3, &kvs, &[("a.weight", &[4], 0), ("b.weight", &[2, 2], 0)]);
    let data_start = bytes.len().next_multiple_of(alignment as usize);
    for (i, values) in [[1f32, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]]
        .iter()
        .enumerate()
    {
        bytes.resize(data_start + 64 * i, 0xee);
        bytes.extend(values.iter().flat_map(|v| v.to_le_bytes()));
    }
    bytes
}

#[test]
fn preparation_reads_tensor_data_after_the_aligned_header() {
    for alignment in [32, 64, 256] {
        let bytes = two_f32_tensors(alignment);
        let mut file = GgufFile::open("m.gguf", io::Cursor::new(bytes)).unwrap();
        assert_eq!(
            file.tensor_f32("b.weight").unwrap(),
            (vec![2, 2], vec![5.0, 6.0, 7.0, 8.0]),
            "alignment {alignment}"
        );
        assert_eq!(
            file.tensor_f32("a.weight").unwrap().1,
            vec![1.0, 2.0, 3.0, 4.0]
        );
        let missing = file.tensor_raw("c.weight").unwrap_err();
        assert_eq!(missing.problem, "the checkpoint has no tensor c.weight");
    }
}

#[test]
fn tensor_data_past_the_end_and_bad_alignments_are_refused() {
    let mut bytes = two_f32_tensors(32);
    bytes.pop();
    let mut file = GgufFile::open("m.gguf", io::Cursor::new(bytes)).unwrap();
    let p = file.tensor_raw("b.weight").unwrap_err().problem;
    assert!(p.contains("reaches past the end of the file"), "{p}");

    let p = GgufFile::open("m.gguf", io::Cursor::new(two_f32_tensors(48)))
        .err()
        .expect("should be rejected")
        .problem;
    assert_eq!(
        p,
        "metadata \"general.alignment\" is 48, not a power of two"
    );
    let p = problem(&build(3, &[("general.alignment", s("32"))], &[]));
    assert_eq!(
        p,
        "metadata \"general.alignment\" is a string, expected a positive integer"
    );
}
