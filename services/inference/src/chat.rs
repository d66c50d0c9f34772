//! Chat messages into a prompt with the model's own Jinja chat template (minijinja, with the
//! Python string methods HF templates call).

use kiln_core::Error;
use kiln_proto::kiln_inference::v1::ChatMessage;

/// The most steps a chat template may take (about a tenth of a second): a model's template is
/// code its uploader wrote, and a loop of loops must not hold a request, or the node, for
/// minutes (found by the fuzz target chat_template). Real templates take a few per message.
const TEMPLATE_FUEL: u64 = 5_000_000;

/// ChatML, for models whose bundle carries no template.
const CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// Renders `messages` with `template` (empty: ChatML), ending with the opening of the
/// assistant's turn when `add_generation_prompt`.
pub fn render(
    template: &str,
    messages: &[ChatMessage],
    bos_token: &str,
    eos_token: &str,
    add_generation_prompt: bool,
) -> Result<String, Error> {
    if messages.is_empty() {
        return Err(Error::invalid("messages", "must hold at least one message"));
    }
    for (i, m) in messages.iter().enumerate() {
        if !matches!(m.role.as_str(), "system" | "user" | "assistant") {
            return Err(Error::invalid(
                format!("messages[{i}].role"),
                format!("must be system, user or assistant, got {:?}", m.role),
            ));
        }
    }
    let mut env = minijinja::Environment::new();
    env.set_fuel(Some(TEMPLATE_FUEL));
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function(
        "raise_exception",
        |message: String| -> Result<String, minijinja::Error> {
            Err(minijinja::Error::new(
                minijinja::ErrorKind::InvalidOperation,
                message,
            ))
        },
    );
    let source = if template.is_empty() {
        CHATML
    } else {
        template
    };
    env.add_template("chat", source).map_err(|e| {
        Error::FailedPrecondition(format!("the model's chat template does not parse: {e}"))
    })?;
    let messages: Vec<minijinja::Value> = messages
        .iter()
        .map(|m| {
            let mut fields = vec![
                ("role", minijinja::Value::from(m.role.as_str())),
                ("content", minijinja::Value::from(m.content.as_str())),
            ];
            if !m.name.is_empty() {
                fields.push(("name", minijinja::Value::from(m.name.as_str())));
            }
            minijinja::Value::from_pairs(fields)
        })
        .collect();
    env.get_template("chat")
        .and_then(|t| {
            t.render(minijinja::context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => bos_token,
                eos_token => eos_token,
            })
        })
        .map_err(|e| match e.kind() {
            minijinja::ErrorKind::OutOfFuel => Error::FailedPrecondition(format!(
                "the model's chat template ran past {TEMPLATE_FUEL} steps; fix the template"
            )),
            _ => Error::invalid(
                "messages",
                format!("the model's chat template refused them: {e}"),
            ),
        })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn msg(role: &str, content: &str) -> ChatMessage {
        ChatMessage {
            role: role.into(),
            content: content.into(),
            name: String::new(),
        }
    }

    /// SmolLM2's template (from its GGUF), which adds a default system prompt.
    pub(crate) const SMOLLM2: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn smollm2_template_adds_its_system_prompt() {
        let out = render(SMOLLM2, &[msg("user", "Hi")], "", "", true).unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        let out = render(
            SMOLLM2,
            &[msg("system", "Be brief."), msg("user", "Hi")],
            "",
            "",
            true,
        )
        .unwrap();
        assert!(out.starts_with("<|im_start|>system\nBe brief.<|im_end|>\n"));
    }

    #[test]
    fn python_methods_work_and_bad_roles_are_named() {
        let t = "{% for m in messages %}{{ m['content'].strip().upper() }}{% endfor %}";
        assert_eq!(
            render(t, &[msg("user", "  hi ")], "", "", true).unwrap(),
            "HI"
        );
        let err = render("", &[msg("user", "a"), msg("robot", "b")], "", "", true).unwrap_err();
        assert!(err.to_string().starts_with("messages[1].role:"), "{err}");
        let err = render(
            "{{ raise_exception('no system') }}",
            &[msg("user", "a")],
            "",
            "",
            true,
        )
        .unwrap_err();
        assert!(err.to_string().contains("no system"), "{err}");
    }

    #[test]
    fn a_template_that_loops_for_ever_runs_out_of_steps_and_a_long_chat_does_not() {
        let loops =
            "{% for i in range(10000) %}{% for j in range(10000) %}x{% endfor %}{% endfor %}";
        let start = std::time::Instant::now();
        let err = render(loops, &[msg("user", "a")], "", "", true).unwrap_err();
        assert!(err.to_string().contains("steps"), "{err}");
        assert!(start.elapsed() < std::time::Duration::from_secs(2));
        // A thousand turns through SmolLM2's template stay well inside the budget.
        let chat: Vec<ChatMessage> = (0..1000)
            .map(|i| msg(if i % 2 == 0 { "user" } else { "assistant" }, "some words"))
            .collect();
        assert!(render(SMOLLM2, &chat, "", "", true).is_ok());
    }
}
