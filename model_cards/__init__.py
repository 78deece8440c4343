"""Model card templates, installed as `esam_hf.model_cards`."""
