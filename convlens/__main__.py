from convlens.cli import main

main()
