"""Kafka stream-processing worker for live, speaker-attributed speech-to-text."""
