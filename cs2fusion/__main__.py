from cs2fusion.cli import main

main()
