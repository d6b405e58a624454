"""gptcli: pretrain, evaluate and sample GPT models from scratch."""
