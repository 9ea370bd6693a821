"""`python -m megalatent` runs the trainer, like `python -m megalatent.pretrain`."""
from megalatent.pretrain import main

main()
