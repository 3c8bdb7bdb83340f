"""Golden tests per format: record -> canonical messages -> exact input_ids and labels (tiny tokenizer in code).

The tokenizer is a WordLevel one (data_helpers.word_tokenizer) whose ids are: <unk> 0, <s> 1, </s> 2, "\\n" 3,
then the words of W in order (system 4, user 5, bot 6, function_call 7, function_response 8, hi 9, ...).
The template is impruver's saiga one: ``<s>{role}\\n{content}</s>\\n`` per turn, the assistant written ``bot``.
"""

from __future__ import annotations

import pytest

from data_helpers import encoder_for, word_tokenizer
from impruver.data import formats as F
from impruver.data.messages import RecordError, SkipRecord, validate
from impruver.data.render import SourceOptions
from impruver.data.templates import SAIGA

W = ["system", "user", "bot", "function_call", "function_response", "hi", "hello", "2+2?", "4", "be", "brief",
     "think", "<think>", "</think>", "two", "and", "ok", "bye", '{"name":', '"add",', '"arguments":', '{"a":', "1}}",
     '{"sum":', "1}"]
X = -100


@pytest.fixture(scope="module")
def encoder():
    return encoder_for(word_tokenizer(W), SAIGA)


def encode(encoder, conversations, **options):
    results = encoder.encode([validate(c, "test") for c in conversations], SourceOptions(max_tokens=100, **options))
    return [(_ids(s.input_ids), _ids(s.labels)) for r in results for s in r]


def _ids(values):
    """A sample's ids as a list: a chat's are one, raw text's an int32 array."""
    return values.tolist() if hasattr(values, "tolist") else values


def test_instruct(encoder):
    convs = F.instruct({"instruction": "2+2?", "input": "", "output": "4", "label": "ok"})
    assert convs == [{"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}]
    assert encode(encoder, convs) == [([1, 5, 3, 11, 2, 3, 1, 6, 3, 12, 2, 3],
                                       [X, X, X, X, X, X, X, X, X, 12, 2, X])]


def test_instruct_input_history_instances_answer_and_bad_rows():
    assert F.instruct({"instruction": "a", "input": "b", "output": "c"})[0]["messages"][0]["content"] == "a\n\nb"
    assert F.instruct({"instruction": "a", "answer": "c"})[0]["messages"][1]["content"] == "c"
    lima = F.instruct({"instruction": "q2", "input": "", "output": "a2", "history": [["q1", "a1"]]})
    assert [m["content"] for m in lima[0]["messages"]] == ["q1", "a1", "q2", "a2"]
    seeds = F.instruct({"instruction": "i", "instances": [{"input": "", "output": "o1"}, {"input": "x", "output": "o2"}]})
    assert [c["messages"][1]["content"] for c in seeds] == ["o1", "o2"]
    with pytest.raises(SkipRecord) as skipped:  # ru_turbo_alpaca's label, compared on the right field
        F.instruct({"instruction": "a", "output": "b", "label": "bad_output"})
    assert skipped.value.reason == "bad_output"
    with pytest.raises(RecordError, match="no field 'output'") as missing:
        F.instruct({"instruction": "a"})
    assert missing.value.reason == "missing_field"


def test_saiga_struct_of_lists_and_bot_role(encoder):
    convs = F.saiga({"messages": {"role": ["system", "user", "bot"], "content": ["be brief", "hi", "hello"]}})
    assert convs == [{"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                                   {"role": "assistant", "content": "hello"}]}]
    assert encode(encoder, convs) == [([1, 4, 3, 13, 14, 2, 3, 1, 5, 3, 9, 2, 3, 1, 6, 3, 10, 2, 3],
                                       [X] * 16 + [10, 2, X])]
    as_list = F.saiga({"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                                    {"role": "bot", "content": "hello"}]})
    assert as_list == convs


def test_saiga_keeps_system_as_system_and_rejects_unknown_roles():
    # The users' converter turned every non-user role, system included, into the assistant.
    convs = F.saiga({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                                  {"role": "bot", "content": "b"}]})
    assert [m["role"] for m in convs[0]["messages"]] == ["system", "user", "assistant"]
    with pytest.raises(RecordError, match="role 'robot'") as err:
        F.saiga({"messages": [{"role": "robot", "content": "x"}]})
    assert err.value.reason == "unknown_role"


def test_sharegpt(encoder):
    record = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"},
                                {"from": "human", "value": "bye"}, {"from": "gpt", "value": "ok"}]}
    convs = F.sharegpt(record)
    assert [m["role"] for m in convs[0]["messages"]] == ["user", "assistant", "user", "assistant"]
    assert encode(encoder, convs) == [(
        [1, 5, 3, 9, 2, 3, 1, 6, 3, 10, 2, 3, 1, 5, 3, 21, 2, 3, 1, 6, 3, 20, 2, 3],
        [X, X, X, X, X, X, X, X, X, 10, 2, X, X, X, X, X, X, X, X, X, X, 20, 2, X])]


def test_sharegpt_tools_and_function_turns():
    record = {"conversations": [{"from": "human", "value": "add"}, {"from": "function_call",
              "value": '{"name": "add", "arguments": {"a": 1}}'}, {"from": "observation", "value": "1"},
              {"from": "gpt", "value": "1"}], "tools": '[{"name": "add", "parameters": {}}]'}
    (conv,) = F.sharegpt(record)
    assert [m["role"] for m in conv["messages"]] == ["user", "function_call", "function_response", "assistant"]
    assert conv["tools"] == [{"type": "function", "function": {"name": "add", "parameters": {}}}]


def test_openai_tool_calls_and_parts(encoder):
    record = {"messages": [
        {"role": "user", "content": [{"type": "text", "text": "2+2?"}]},
        {"role": "assistant", "content": None,
         "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": '{"a": 1}'}}]},
        {"role": "tool", "content": '{"sum": 1}'},
        {"role": "assistant", "content": "4"}]}
    convs = F.openai(record)
    assert convs[0]["messages"] == [
        {"role": "user", "content": "2+2?"},
        {"role": "function_call", "content": '{"name": "add", "arguments": {"a": 1}}'},
        {"role": "function_response", "content": '{"sum": 1}'},
        {"role": "assistant", "content": "4"}]
    assert encode(encoder, convs) == [(
        [1, 5, 3, 11, 2, 3, 1, 7, 3, 22, 23, 24, 25, 26, 2, 3, 1, 8, 3, 27, 28, 2, 3, 1, 6, 3, 12, 2, 3],
        [X, X, X, X, X, X, X, X, X, 22, 23, 24, 25, 26, 2, X, X, X, X, X, X, X, X, X, X, X, 12, 2, X])]


def test_openai_messages_as_json_string_with_impruver_roles():
    # glaive-function-calling-v2-ru-parsed: messages is a JSON string; roles function_call / function_response.
    record = {"messages": '[{"role": "system", "content": "s"}, {"role": "user", "content": "u"}, '
                          '{"role": "function_call", "content": "{\\"name\\": \\"f\\", \\"arguments\\": \\"{}\\"}"}, '
                          '{"role": "function_response", "content": "{}"}, {"role": "assistant", "content": "a"}]',
              "functions": "ignored"}
    (conv,) = F.openai(record)
    assert conv["messages"][2] == {"role": "function_call", "content": '{"name": "f", "arguments": {}}'}
    assert [m["role"] for m in conv["messages"]] == ["system", "user", "function_call", "function_response",
                                                     "assistant"]


def test_openai_rejects_images_and_unknown_roles():
    with pytest.raises(RecordError) as err:
        F.openai({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]})
    assert err.value.reason == "non_text_content"
    with pytest.raises(RecordError) as err:
        F.openai({"messages": [{"role": "narrator", "content": "x"}]})
    assert err.value.reason == "unknown_role"


def test_roleplay(encoder):
    record = {"name": "bot", "context": "be brief", "greeting": "hi", "example_dialogue": [],
              "dialogues": [{"chat": [{"role": "operator", "content": "hello"}, {"role": "char", "content": "ok"}]},
                            {"chat": [{"role": "operator", "content": "bye"}, {"role": "char", "content": "ok"}]}]}
    convs = F.roleplay(record)
    assert len(convs) == 2  # one record, several conversations
    assert convs[0]["messages"] == [{"role": "system", "content": "bot. be brief"},
                                    {"role": "assistant", "content": "hi"}, {"role": "user", "content": "hello"},
                                    {"role": "assistant", "content": "ok"}]
    ids, labels = encode(encoder, convs[:1])[0]
    assert ids == [1, 4, 3, 0, 13, 14, 2, 3, 1, 6, 3, 9, 2, 3, 1, 5, 3, 10, 2, 3, 1, 6, 3, 20, 2, 3]
    assert labels == [X] * 11 + [9, 2] + [X] * 10 + [20, 2, X]


def test_text_is_trained_everywhere_and_chunked(encoder):
    convs = F.text({"text": "hi hello hi"})
    assert encode(encoder, convs) == [([9, 10, 9, 2], [9, 10, 9, 2])]
    results = encoder.encode(F.text({"text": "hi hello hi hello hi"}), SourceOptions(max_tokens=4))
    assert [(_ids(s.input_ids), _ids(s.labels)) for s in results[0]] == [([9, 10, 9, 10], [9, 10, 9, 10]),
                                                                       ([9, 2], [9, 2])]


def test_reasoning(encoder):
    convs = F.reasoning({"prompt": "2+2?", "reasoning": "two and two", "answer": "4"})
    assert convs[0]["messages"][1] == {"role": "assistant", "content": "4", "reasoning": "two and two"}
    assert encode(encoder, convs) == [(
        [1, 5, 3, 11, 2, 3, 1, 6, 3, 16, 3, 18, 19, 18, 3, 17, 3, 3, 12, 2, 3],
        [X, X, X, X, X, X, X, X, X, 16, 3, 18, 19, 18, 3, 17, 3, 3, 12, 2, X])]


@pytest.mark.parametrize("conversation,reason", [
    ({"messages": []}, "empty_conversation"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "no_assistant_turn"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]}, "empty_message"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ["x"]}]}, "non_text_content"),
    ({"messages": [{"role": "human", "content": "hi"}]}, "unknown_role"),
])
def test_validation(conversation, reason):
    with pytest.raises(RecordError) as err:
        validate(conversation, "rec")
    assert err.value.reason == reason
