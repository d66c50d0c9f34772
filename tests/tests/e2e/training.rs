//! The trainer against the serving path on SmolLM2: its forward, on the weights it reads from
//! the GGUF, gives the logits the prepared float32 graph gives, bare and with an adapter in the
//! graph's LoRA slots; so an adapter it trains is the adapter the served model applies.

use kiln_tests::inference::{load_session, max_abs_diff};
use kiln_tests::llm::{GGUF, decoder_logits, reference};
use kiln_tests::lora::{ALL, alone_in_slots, graph, lora_weights, seeded_lora};
use kiln_trainer::{Adapter, Base, DType, Device, Tensor};

/// The logits of every position of `prompt`: the trainer's, and the graph's (`adapter` in
/// its slots when given).
fn both_logits(
    base: &Base,
    prompt: &[u32],
    adapter: Option<(&Adapter, &kiln_formats::LoraWeights)>,
) -> (Vec<f32>, Vec<f32>) {
    let ids = Tensor::new(prompt, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let hidden = base.hidden(&ids, adapter.map(|(a, _)| a)).unwrap();
    let trainer: Vec<f32> = base
        .logits(&hidden)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let mut session = load_session(
        "onnxruntime",
        &graph(false, usize::from(adapter.is_some())),
        2,
    );
    if let Some((_, weights)) = adapter {
        let resident = alone_in_slots(session.inputs(), weights, 1);
        session.set_resident(resident).unwrap();
    }
    let n = prompt.len();
    let (served, _) = decoder_logits(
        session.as_mut(),
        [1, n],
        prompt.iter().map(|&t| i64::from(t)).collect(),
        vec![1; n],
        (0..n as i64).collect(),
    );
    (trainer, served)
}

#[test]
fn the_trainer_computes_what_the_served_model_does() {
    let gguf = std::fs::File::open(kiln_tests::asset(GGUF)).unwrap();
    let checkpoint = kiln_formats::read_llama_checkpoint(std::io::BufReader::new(gguf)).unwrap();
    let base = Base::new(checkpoint, DType::F32, &Device::Cpu).unwrap();
    let prompt = &reference().chat[0].prompt_tokens;

    let (trainer, served) = both_logits(&base, prompt, None);
    assert_eq!(trainer.len(), served.len());
    let bare = max_abs_diff(&trainer, &served);
    assert!(bare < 1e-3, "bare base: logits differ by up to {bare}");

    let (config, weights) = seeded_lora(4, 8, &ALL, 0.2, false);
    let lora = lora_weights(&config, &weights);
    let adapter = Adapter::from_weights(&lora, 16.0, DType::F32, &Device::Cpu).unwrap();
    let (trainer, served) = both_logits(&base, prompt, Some((&adapter, &lora)));
    let adapted = max_abs_diff(&trainer, &served);
    let moved = max_abs_diff(&served, &both_logits(&base, prompt, None).1);
    assert!(moved > 1.0, "the adapter changes the logits ({moved})");
    assert!(
        adapted < 1e-3,
        "with the adapter: logits differ by up to {adapted}"
    );
    eprintln!("max |Δ logit|: bare {bare}, adapted {adapted} (the adapter moves them {moved})");
}
