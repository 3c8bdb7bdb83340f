"""An example impruver plugin: records of question / answer pairs, optionally with a topic."""

from __future__ import annotations

from typing import Any


def qa_pairs(record: dict[str, Any], *, topic_as_system: bool = True) -> list[dict[str, Any]]:
    """Turn ``{"question", "answer", "topic"?}`` into one conversation in impruver's canonical form.

    Args:
        record: one input record.
        topic_as_system: put ``Topic: <topic>`` in a system turn when the record has a topic.
    """
    from impruver.data.messages import RecordError

    for key in ("question", "answer"):
        if not isinstance(record.get(key), str) or not record[key].strip():
            raise RecordError("missing_field", f"qa-pairs needs a text field '{key}'")
    messages = [{"role": "user", "content": record["question"]},
                {"role": "assistant", "content": record["answer"]}]
    if topic_as_system and record.get("topic"):
        messages.insert(0, {"role": "system", "content": f"Topic: {record['topic']}"})
    return [{"messages": messages}]
