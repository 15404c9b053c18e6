"""The streaming engine: many live calls batched through NeMo's multi-talker models.

No Kafka here.
"""
