"""The Kafka side: consume, order, produce, checkpoint, recover. No tensors here."""
