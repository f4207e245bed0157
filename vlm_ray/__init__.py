"""vlm-ray: fine-tune vision-language models and run bulk captioning/OCR + evaluation on Ray."""

import logging

# bitsandbytes warns on every CPU import that an optional kernels package is missing;
# 4-bit is a GPU feature here, so the warning only buries the stage logs (driver and actors).
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
