"""Producer-side tools: publish call audio to Kafka, generate load, follow transcripts.

The library API is ``AudioChunkProducer`` (see ``producer_tools/producer.py`` for an example);
``python -m producer_tools`` wraps it in commands.
"""

from producer_tools.producer import AudioChunkProducer, AudioStream, ProducerError

__all__ = ["AudioChunkProducer", "AudioStream", "ProducerError"]
