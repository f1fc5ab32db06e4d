from polytask.cli import main

main()
