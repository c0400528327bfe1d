#!/bin/sh
# Entrypoint of the rlhf-platform images: the first argument selects what runs, the rest is
# passed on. Settings are environment variables; `<service> --help` lists them.
set -eu

usage() {
    cat <<'USAGE'
usage: <service> [arguments]

services:
  generation        serve the policy (gRPC, and HTTP: TGI and OpenAI chat completions)
  feedback          ingest users' feedback
  reward            serve the reward model
  trainer           a trainer stage (RLHF_TRAINER_STAGE: ppo, reward or sft)
  simulated-users   demo traffic
  playground        a chat page where people rate answers
  topics            create the Kafka topics (python -m rlhf.topics_cli --help)
  broker            an in-memory Kafka-compatible broker with the topics, for trials only
USAGE
}

service="${1:-}"
case "$service" in
    generation | feedback | reward | trainer | simulated-users | playground | broker)
        shift
        exec "rlhf-$service" "$@"
        ;;
    topics)
        shift
        exec python -m rlhf.topics_cli "$@"
        ;;
    -h | --help | help)
        usage
        ;;
    *)
        usage >&2
        echo "unknown service: '$service'" >&2
        exit 64
        ;;
esac
