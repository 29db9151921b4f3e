from cmrcnet.cli import main

main()
