"""Operations: CLI, settings, local Kafka broker, metrics and deployment helpers."""
