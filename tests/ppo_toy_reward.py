"""A toy reward for the PPO tests (loaded through PPO_REWARD_FN): how often the response
contains the letter 'a', a behaviour a random tiny model shows rarely and PPO can raise."""

TARGET = "a"


def reward(prompts, responses):
    return [min(text.count(TARGET), 8) / 8.0 for text in responses]
