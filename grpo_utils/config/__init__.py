"""The config: its schema (:mod:`.schema`: every key's type, default and doc), the checks on a
composed config (:mod:`.validate`) and on the command line before Hydra composes (:mod:`.cli`).
Importing this package registers the schema with Hydra's ConfigStore."""

from grpo_utils.config.schema import register_schema

register_schema()
