"""Methods that adapt a trained model: supervised fine-tuning, parameter-efficient adapters, distillation."""
