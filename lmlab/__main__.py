from lmlab.cli import main

main()
