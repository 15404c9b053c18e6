"""Producer-side tools: stream audio files to Kafka, generate load, synthesise test calls."""
