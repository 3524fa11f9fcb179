"""`python -m keras_fip.distribute [--workers=2] [--timeout=3600] -- COMMAND...`."""

from keras_fip.distribute.launch import main

main()
